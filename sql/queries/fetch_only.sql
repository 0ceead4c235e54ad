-- Fetch only, no function: what the SQL path costs before any inference ($where: the run's sample,
-- e.g. " WHERE id < 1000", pushed down to PostgreSQL; empty for the whole split).
SELECT id, img FROM pg.cifar_test$where;
