"""cnnsql: which framework should run my CNN over data that lives in a database?"""

__version__ = "0.1.0"
