"""`sqlops` command line: the side-effecting steps that live outside `dvc repro`, and the one
entry point of the Prefect flows. It sits above both the library (pipelines/) and the flows, so
it is the only module that imports both.

sqlops release               register the adapter, gate it, move `champion` if it wins (and
                             deploy it when a model is being served)
sqlops rollback [--to N]     point `champion` back at the previous (or a given) version (and
                             deploy it when vLLM is running; the MLflow UI's alias editor does
                             the same through the gateway's webhook)
sqlops deploy [--version N]  serve the champion (or make N the champion and serve it) in vLLM
                             behind the gateway, smoke test, roll back by itself on failure
sqlops serve [--background]  vLLM (started if needed) + the champion + the gateway on loopback;
                             `sqlops serve --stop` ends both
sqlops summary               base vs tuned figures, run id, versions, how to open the UIs
sqlops flow training         run the Prefect training flow (each DVC stage a task, then release)
sqlops flow release          run the Prefect release flow (register, gate, deploy, smoke, rollback)
sqlops flow monitoring [--hours N] [--no-retrain]
                             drift check on the inference log; retrains when the policy says so
sqlops flow demo [--arm none|human|teacher]
                             the closed loop: traffic, drift, feedback or teacher labels,
                             retraining, promotion
sqlops label                 the teacher labels the inference log's doubtful requests into the
                             teacher data source (verified; quarantine and cost in the report)
sqlops prefect serve         serve the training + monitoring deployments to a Prefect server
sqlops experiment lora-rank  train + evaluate at LoRA ranks 8/16/64, one table (seed book)
sqlops experiment precision  the same for fp32 vs bf16 autocast
sqlops experiment decoding   greedy / + grammar / + n candidates / + both, and gateway latency
sqlops eval --dataset spider:<dir> --model models:/<name>@champion|base [--model ...]
                             score registered versions / the base model on a Spider-format set
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipelines.config import ROOT, load_params, setup_entry_point


def cmd_release(args: argparse.Namespace) -> int:
    from pipelines.release.controller import reconcile
    from pipelines.release.deploy import is_serving
    from pipelines.release.registry import release

    p = load_params()
    r = release(p)
    state = "reused" if r.reused else "new"
    print(f"version {r.version} ({state}, run {r.run_id}) -> champion: v{r.champion}")
    for reason in r.decision.reasons:
        print(f"  {reason}")
    # This CLI writes the registry directly (no webhook reaches the gateway): deploy here.
    if r.decision.promote and is_serving(p):
        result = reconcile(p)
        print(f"gateway serves v{result.served} ({result.action}{_why(result.error)})")
    return 0


def _why(error: str | None) -> str:
    return f": {error}" if error else ""


def cmd_rollback(args: argparse.Namespace) -> int:
    from pipelines.release.controller import reconcile
    from pipelines.release.registry import rollback
    from pipelines.serving.backend import vllm_url
    from pipelines.serving.vllm_server import VLLMAdmin, model_server

    p = load_params()
    before, after = rollback(p, args.to)
    print(f"champion: v{before} -> v{after}")
    # Written straight to the registry's store: no webhook reaches the gateway, so the CLI
    # deploys (the same path: load, smoke test, route; the alias goes back on failure).
    if VLLMAdmin(vllm_url(p.serving)).healthy():
        r = reconcile(p, server=model_server(p))
        print(f"gateway serves v{r.served}, champion v{r.champion} ({r.action}{_why(r.error)})")
        return 0 if r.served == after else 1
    print("vLLM is not running: `sqlops serve` (or a running gateway's reconcile loop) serves it")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from pipelines.release.deploy import MlflowRegistry, deploy, deploy_lock

    p = load_params()
    registry = MlflowRegistry(p)
    with deploy_lock(p):
        # The registry says what is served: a gateway's reconcile loop would go back otherwise.
        if args.version is not None and args.version != (before := registry.champion()):
            registry.set_champion(args.version)
            print(f"champion: v{before} -> v{args.version}")
        r = deploy(p, args.version, registry=registry, force_smoke_failure=args.force_smoke_failure)
    print(f"{r.name}: smoke test {r.smoke.n_ok}/{r.smoke.n} canaries executed")
    for failure in r.smoke.failures:
        print(f"  {failure}")
    if not r.ok:
        back = f"v{r.rolled_back_to}" if r.rolled_back_to else "nothing (no earlier version)"
        print(f"rolled back: champion and gateway on {back}")
        return 1
    if r.unloaded:
        print(f"unloaded: {', '.join(r.unloaded)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pipelines.release.deploy import serve
    from pipelines.serving.vllm_server import stop_background

    p = load_params()
    if args.stop:
        for name in ("gateway", "vllm"):
            stopped = stop_background(name, p.path("run_dir"))
            print(f"{name}: {'stopped' if stopped else 'not running'}")
        return 0
    return serve(p, background=args.background)


def cmd_label(args: argparse.Namespace) -> int:
    from pipelines.monitoring import teacher

    p = load_params()
    out = teacher.label_logged(p)
    print(teacher.summary_line(out))
    print(f"labels: {out.path}; report: {p.paths.teacher_report}; `dvc repro` trains on them")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from mlflow import MlflowClient
    from pipelines.eval.report import failure_lines, real_schema_line
    from pipelines.monitoring.teacher import read_report, summary_line
    from pipelines.release.registry import CHALLENGER, CHAMPION, current_version, live_traffic
    from pipelines.tracking import configure_mlflow, tracking_uri

    p = load_params()
    needed = [p.path("eval_metrics"), p.path("adapter") / "train_info.json"]
    missing = [str(f.relative_to(ROOT)) for f in needed if not f.is_file()]
    if missing:
        print(f"sqlops summary: no {' or '.join(missing)} yet: run `make run` (or `dvc repro`)")
        return 1
    metrics = json.loads(needed[0].read_text())
    train_info = json.loads(needed[1].read_text())
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
    if "selection" in metrics:  # held out too; knobs are chosen on it, not on the figures above
        s = metrics["selection"]
        picked = s["tuned"]
        print(
            f"  model-selection domain ({', '.join(s['domains'])}, {s['n_examples']} examples): "
            f"tuned execution accuracy {pct(picked['execution_accuracy']).strip()}, "
            f"valid SQL {pct(picked['valid_sql_rate']).strip()}"
        )
    real = real_schema_line(metrics)
    if real:  # databases people built: read it, choose no knob on it
        print(f"  {real}")
    lines = failure_lines(metrics)
    if lines:
        print("  tuned model's wrong answers by failure class:")
        print("\n".join(f"    {line}" for line in lines))
    print(
        f"\nTraining: {train_info['steps']} steps in {train_info['seconds'] / 60:.1f} min, "
        f"final loss {train_info['final_loss']:.3f}; MLflow run {train_info['run_id']}"
    )
    print(f"Registry: {name} champion v{champion}, challenger v{challenger}")
    labelled = read_report(p.path("teacher_report"))
    if labelled:  # the last `sqlops label` / monitoring flow's labelling
        print(f"Flywheel: {summary_line(labelled)}")
    traffic = live_traffic(p)
    if traffic:
        print("Live traffic (shadow answers, serving.shadow_share):")
        for served, live in sorted(traffic.items()):
            print(f"  {served:<20} {live.n:>6} answers, execution errors {pct(live.rate)}")
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
    elif args.name == "release":
        from flows.release import release

        return 0 if release(force_smoke_failure=args.force_smoke_failure)["ok"] else 1
    elif args.name == "monitoring":
        from flows.monitoring import monitoring

        out = monitoring(window_hours=args.hours, retrain=not args.no_retrain)
        print(json.dumps(out, indent=2))
    elif args.name == "demo":
        from flows.demo import demo
        from pipelines.release.gate import improved

        r = demo(arm=args.arm)
        if args.arm == "none":  # the control adds no data: nothing to improve
            return 0
        return 0 if improved(r["drifted_domain_ex_before"], r["drifted_domain_ex_after"]) else 1
    return 0


def cmd_prefect(args: argparse.Namespace) -> int:
    from flows.deployments import serve_deployments

    serve_deployments()
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from pipelines.bench import experiment

    if args.name == "decoding":
        from pipelines.bench import decoding

        table = decoding.run(
            load_params(),
            args.split,
            args.n,
            args.adapter,
            args.requests,
            not args.no_serving,
            args.rows,
            args.merged,
        )
        print(table.read_text())
        print(f"written to {table}")
        return 0
    variants = (
        experiment.lora_rank_variants(args.ranks)
        if args.name == "lora-rank"
        else experiment.PRECISION_VARIANTS
    )
    table = experiment.run(load_params(), args.name, variants, args.steps)
    print(table.read_text())
    print(f"written to {table}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pipelines.eval import external
    from pipelines.eval.failures import CLASSES, summary_line

    p = load_params()
    out = args.out or external.default_out_dir(p, args.dataset)
    metrics = external.run(p, args.dataset, args.model, out, args.max_examples)
    print(f"\n{args.dataset}: {metrics['n_examples']} examples, judge {metrics['judge']['status']}")
    print(f"  {'model':<24}{'execution':>10}{'95% CI':>16}{'exact':>8}{'valid':>8}{'judge':>8}")
    for label in metrics["models"]:
        m = metrics[label]
        lo, hi = m["execution_accuracy_ci95"]
        judge = "n/a" if m["judge_accuracy"] is None else f"{m['judge_accuracy']:.3f}"
        print(
            f"  {label:<24}{m['execution_accuracy']:>10.3f}{f'[{lo:.3f}, {hi:.3f}]':>16}"
            f"{m['exact_match']:>8.3f}{m['valid_sql_rate']:>8.3f}{judge:>8}"
        )
    print("wrong answers by failure class:")
    for label in metrics["models"]:
        print(f"  {label:<24}{summary_line(metrics[label]['failures'], top=len(CLASSES))}")
    print(f"report: {out} (each prediction's `failure` in predictions.jsonl)")
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
    sub.add_parser("label", help="label doubtful traffic with the teacher (the data flywheel)")
    dp = sub.add_parser("deploy", help="serve the champion in vLLM, smoke test, auto-rollback")
    dp.add_argument("--version", type=int, help="version to serve (default: the champion)")
    sv = sub.add_parser("serve", help="start vLLM + gateway on loopback")
    sv.add_argument("--background", action="store_true", help="return once both are healthy")
    sv.add_argument("--stop", action="store_true", help="stop the background vLLM and gateway")
    fl = sub.add_parser("flow", help="run a Prefect flow")
    fl.add_argument("name", choices=["training", "release", "monitoring", "demo"])
    fl.add_argument("--no-retrain", action="store_true", help="monitoring: check and report only")
    fl.add_argument("--hours", type=float, help="monitoring: window length (default: params.yaml)")
    fl.add_argument(
        "--arm",
        choices=["none", "human", "teacher"],
        default="human",
        help="demo: the new data: none, human corrections (default) or teacher labels only",
    )
    for p in (dp, fl):
        p.add_argument(
            "--force-smoke-failure", action="store_true", help="fail the smoke test (drill)"
        )
    pf = sub.add_parser("prefect", help="serve the Prefect deployments (needs PREFECT_API_URL)")
    pf.add_argument("action", choices=["serve"])
    ex = sub.add_parser("experiment", help="run a training experiment")
    ex.add_argument("name", choices=["lora-rank", "precision", "decoding"])
    ex.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64], help="ranks (lora-rank)")
    ex.add_argument("--steps", type=int, help="steps per rank (default: train.max_steps)")
    ex.add_argument("--split", default="eval.jsonl", help="decoding: the prepared split file")
    ex.add_argument("--n", type=int, default=5, help="decoding: candidates of the n rows")
    ex.add_argument("--adapter", type=Path, help="decoding: adapter (default: paths.adapter)")
    ex.add_argument("--requests", type=int, default=32, help="decoding: gateway requests")
    ex.add_argument("--no-serving", action="store_true", help="decoding: offline rows only")
    ex.add_argument(
        "--rows",
        choices=["all", "bound"],
        default="all",
        help="decoding: bound = greedy and params.yaml's decoding only (the latency bound's)",
    )
    ex.add_argument(
        "--merged",
        action="store_true",
        help="decoding: serve the merged weights (serving.merged) for the gateway rows",
    )
    ev = sub.add_parser("eval", help="evaluate a registered model or the base model on a dataset")
    ev.add_argument("--dataset", required=True, help="spider:<dir> (a Spider-format folder)")
    ev.add_argument(
        "--model",
        required=True,
        action="append",
        help="models:/<name>@<alias>, models:/<name>/<version> or base; repeat to compare",
    )
    ev.add_argument(
        "--max-examples", type=int, help="seeded sample (default: evaluate.max_examples, 0 = all)"
    )
    ev.add_argument("--out", type=Path, help="report folder (default: reports/external/<dataset>)")
    args = parser.parse_args(argv)
    handlers = {
        "release": cmd_release,
        "rollback": cmd_rollback,
        "summary": cmd_summary,
        "label": cmd_label,
        "flow": cmd_flow,
        "deploy": cmd_deploy,
        "serve": cmd_serve,
        "experiment": cmd_experiment,
        "prefect": cmd_prefect,
        "eval": cmd_eval,
    }
    try:
        return handlers[args.command](args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"sqlops {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
