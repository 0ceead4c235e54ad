"""`cnnsql study`: the measurements beyond `cnnsql bench`, each a study run by the one runner
(cnnsql/bench/studies): its table, its VALID/INVALID verdict and a JSON file in results/studies/."""
from __future__ import annotations

import argparse


def cmd_study(args) -> int:
    from cnnsql.bench import studies

    if args.list or not args.name:
        width = max(map(len, studies.STUDIES))
        for name in studies.STUDIES:
            module = studies.load(name)
            needs = " (reads the loaded dataset)" if module.NEEDS_DATABASE else ""
            print(f"{name:<{width}}  {studies.summary_line(module)}{needs}")
        print("\n`cnnsql study NAME --help` tells a study's method and options.")
        return 0
    doc = studies.run(args.name, args.options)
    return 0 if doc["verdict"] == "VALID" else 3


def register_study(sub) -> None:
    st = sub.add_parser("study", help="run one measurement study (cnnsql study --list) and write its JSON result",
                        description=__doc__)
    st.add_argument("--list", action="store_true", help="the studies and what each measures")
    st.add_argument("name", nargs="?", help="the study (see --list)")
    st.add_argument("options", nargs=argparse.REMAINDER, help="the study's own options (NAME --help)")
    st.set_defaults(func=cmd_study)
