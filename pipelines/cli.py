"""`sqlops` command line: the side-effecting steps that live outside `dvc repro`.

sqlops release               register the adapter, gate it, move `champion` if it wins
sqlops rollback [--to N]     point `champion` back at the previous (or a given) version
sqlops summary               base vs tuned figures, run id, versions, how to open the UIs
sqlops flow training         run the Prefect training flow (each DVC stage a task, then release)
"""

from __future__ import annotations

import argparse
import json
import sys

from pipelines.config import load_params, setup_entry_point


def cmd_release(args: argparse.Namespace) -> int:
    from pipelines.release.registry import release

    r = release(load_params())
    state = "reused" if r.reused else "new"
    print(f"version {r.version} ({state}, run {r.run_id}) -> champion: v{r.champion}")
    for reason in r.decision.reasons:
        print(f"  {reason}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from pipelines.release.registry import rollback

    before, after = rollback(load_params(), args.to)
    print(f"champion: v{before} -> v{after}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from mlflow import MlflowClient
    from pipelines.release.registry import CHALLENGER, CHAMPION, current_version
    from pipelines.tracking import configure_mlflow, tracking_uri

    p = load_params()
    metrics = json.loads(p.path("eval_metrics").read_text())
    train_info = json.loads((p.path("adapter") / "train_info.json").read_text())
    configure_mlflow(p.mlflow)
    client = MlflowClient()
    name = p.registry.model_name
    champion = current_version(client, name, CHAMPION)
    challenger = current_version(client, name, CHALLENGER)
    b, t = metrics["base"], metrics["tuned"]
    n = metrics["n_examples"]
    judge = metrics["judge"]["status"]

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:5.1f}%"

    rows = [
        ("execution accuracy", b["execution_accuracy"], t["execution_accuracy"]),
        ("  on non-empty gold", b["execution_accuracy_nonempty"], t["execution_accuracy_nonempty"]),
        ("exact match", b["exact_match"], t["exact_match"]),
        ("valid SQL", b["valid_sql_rate"], t["valid_sql_rate"]),
        (f"judge accuracy ({judge})", b["judge_accuracy"], t["judge_accuracy"]),
    ]
    lo, hi = t["execution_accuracy_ci95"]
    print(f"\nHeld-out evaluation ({n} examples, domains: {', '.join(t['by_domain'])})")
    print(f"  {'metric':<28}{'base':>8}{'tuned':>8}")
    for label, x, y in rows:
        print(f"  {label:<28}{pct(x):>8}{pct(y):>8}")
    print(f"  tuned execution accuracy 95% CI: [{pct(lo).strip()}, {pct(hi).strip()}]")
    print(
        f"\nTraining: {train_info['steps']} steps in {train_info['seconds'] / 60:.1f} min, "
        f"final loss {train_info['final_loss']:.3f}; MLflow run {train_info['run_id']}"
    )
    print(f"Registry: {name} champion v{champion}, challenger v{challenger}")
    print(
        f"\nMLflow UI:  make ui  (or: mlflow ui --backend-store-uri {tracking_uri(p.mlflow)} "
        "--host 127.0.0.1 --port 5000) -> http://127.0.0.1:5000"
    )
    print("Prefect UI: make ui -> http://127.0.0.1:4200   (sqlops flow training runs the DAG)")
    return 0


def cmd_flow(args: argparse.Namespace) -> int:
    if args.name == "training":
        from flows.training import training

        training()
    return 0


def main(argv: list[str] | None = None) -> int:
    setup_entry_point()
    parser = argparse.ArgumentParser(
        prog="sqlops", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("release", help="register, gate and promote the current adapter")
    rb = sub.add_parser("rollback", help="move the champion alias back")
    rb.add_argument("--to", type=int, help="version to make champion (default: the previous one)")
    sub.add_parser("summary", help="print base vs tuned figures and registry state")
    fl = sub.add_parser("flow", help="run a Prefect flow")
    fl.add_argument("name", choices=["training"])
    args = parser.parse_args(argv)
    handlers = {
        "release": cmd_release,
        "rollback": cmd_rollback,
        "summary": cmd_summary,
        "flow": cmd_flow,
    }
    try:
        return handlers[args.command](args)
    except (FileNotFoundError, ValueError) as e:
        print(f"sqlops {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
