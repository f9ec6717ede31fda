//! The command line, as clap sees it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::DEFAULT_COORDINATOR;

/// recur: train recurrent models on sequence data across machines, and serve predictions.
#[derive(Debug, Parser)]
#[command(name = "recur", version, about, propagate_version = true)]
pub struct Cli {
    /// The coordinator to talk to.
    #[arg(long, global = true, env = "RECUR_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
    pub coordinator: String,
    /// Client token (`authorization: Bearer <token>`).
    #[arg(long, global = true, env = "RECUR_CLIENT_TOKEN", hide_env_values = true, value_parser = recur_proto::token::parse)]
    pub token: Option<String>,
    /// CA certificate (PEM) of a TLS coordinator (use an https:// URL).
    #[arg(long, global = true, env = "RECUR_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), for a coordinator that requires mutual TLS.
    #[arg(long, global = true, env = "RECUR_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM).
    #[arg(long, global = true, env = "RECUR_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Name expected in the coordinator's certificate, when not the URL's host.
    #[arg(long, env = "RECUR_TLS_DOMAIN", global = true)]
    pub tls_domain: Option<String>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, env = "RECUR_JSON", value_parser = clap::builder::FalseyValueParser::new(), global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the tutorial end to end on an embedded cluster (coordinator + 2 workers).
    Demo(DemoArgs),
    /// Serve an embedded coordinator and workers until Ctrl-C.
    Local(LocalArgs),
    /// Run a worker for the --coordinator (the same as the `recur-worker` binary).
    Worker(WorkerArgs),
    /// Measure the data plane: real coordinator and worker processes on loopback; throughput,
    /// step time split, scaling against one worker, and (with --predict) Predict.
    Bench(BenchArgs),
    /// Generate data.
    #[command(subcommand)]
    Gen(GenCommand),
    /// Upload a CSV file, submit a training job, and watch it.
    Train(Box<TrainArgs>),
    /// List jobs.
    Jobs,
    /// Show a job.
    Status {
        /// The job id.
        job: String,
    },
    /// Follow a job's progress until it ends.
    Watch {
        /// The job id.
        job: String,
    },
    /// Cancel a queued or running job.
    Cancel {
        /// The job id.
        job: String,
    },
    /// Delete an ended job: its history, step log and checkpoints.
    Delete {
        /// The job id.
        job: String,
    },
    /// List uploaded datasets (`recur datasets delete ID` deletes one).
    Datasets {
        /// What to do (default: list).
        #[command(subcommand)]
        command: Option<DatasetsCommand>,
    },
    /// List connected workers.
    Workers,
    /// Predict the next value of histories with a job's best model.
    Predict(PredictArgs),
    /// Download a job's checkpoint (safetensors, with its JSON manifest beside it).
    Checkpoint(CheckpointArgs),
    /// Print a shell completion script: `recur completions bash > /etc/bash_completion.d/recur`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): `recur man > recur.1`.
    Man,
    /// Chart a job's training and validation accuracy per epoch (PNG or SVG).
    Plot {
        /// The job id.
        job: String,
        /// Output file; `.png` or `.svg`.
        #[arg(short, long)]
        output: PathBuf,
    },
}

/// `recur demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Workers to start.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Rows of ball data to generate.
    #[arg(long, default_value_t = 10_000)]
    pub rows: usize,
    /// Seed of the data and the job.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to write the accuracy chart.
    #[arg(long, default_value = "recur-demo-accuracy.png")]
    pub chart: PathBuf,
    /// Where the workers compute: `cpu` or `cuda:N` (a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// `recur local`.
#[derive(Debug, Args)]
pub struct LocalArgs {
    /// Workers to start.
    #[arg(long, env = "RECUR_LOCAL_WORKERS", default_value_t = 2)]
    pub workers: usize,
    /// Data directory (default: a temporary one, removed at exit).
    #[arg(long, env = "RECUR_LOCAL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "RECUR_LOCAL_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// Where the workers compute: `cpu` or `cuda:N` (a build with `--features cuda`).
    #[arg(long, env = "RECUR_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Checkpoint sets kept per job and role (latest, best); the sets in use are always kept.
    #[arg(long, env = "RECUR_KEEP_CHECKPOINTS", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    pub keep_checkpoints: u64,
    /// Test hook: every store and checkpoint write takes this many ms longer (a slow disk).
    #[arg(long, default_value_t = 0, hide = true)]
    pub test_write_delay_ms: u64,
}

/// `recur worker`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Name shown in `recur workers` (default: host name and process id).
    #[arg(long, env = "RECUR_WORKER_NAME")]
    pub name: Option<String>,
    /// `cpu` or `cuda:N` (the latter needs a build with `--features cuda`).
    #[arg(long, env = "RECUR_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Compute threads (this process's candle pool is sized once, at start).
    #[arg(long, env = "RECUR_THREADS", default_value_t = 1)]
    pub threads: u32,
    /// Serve this worker's own metrics (`GET /metrics`, plain HTTP) here.
    #[arg(long, env = "RECUR_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// The coordinator's worker token.
    #[arg(long, env = "RECUR_WORKER_TOKEN", hide_env_values = true, value_parser = recur_proto::token::parse)]
    pub worker_token: Option<String>,
}

/// `recur bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Workloads to run.
    #[arg(long, value_enum, value_delimiter = ',', default_values = ["tutorial", "w2"])]
    pub workloads: Vec<BenchWorkload>,
    /// Worker counts to run each workload with (1 is the reference for scaling).
    #[arg(long, value_delimiter = ',', default_values_t = [1, 2])]
    pub workers: Vec<usize>,
    /// Epochs per run; the first is not counted (warm-up, and worker speeds being learned).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    pub epochs: u64,
    /// One-way latency, ms, added between every worker and the coordinator by a proxy in this
    /// process (a stand-in for a network link).
    #[arg(long, default_value_t = 0.0)]
    pub latency_ms: f64,
    /// Also measure Predict on the tutorial model after its 1-worker run (batched throughput;
    /// p50/p99 of single histories at 1,000 requests/s).
    #[arg(long)]
    pub predict: bool,
    /// Directory holding `recur-coordinator` and `recur-worker` (default: beside `recur`).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
}

/// Workloads of `recur bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchWorkload {
    /// The tutorial's model: RNN tanh, hidden 8, batch 100, 10,000 ball rows of 5-10 values.
    Tutorial,
    /// LSTM hidden 128, batch 256, 32,768 ball rows of 10-50 values.
    W2,
}

/// `recur datasets`.
#[derive(Debug, Subcommand)]
pub enum DatasetsCommand {
    /// List uploaded datasets, newest first.
    List,
    /// Delete an uploaded dataset that no queued or running job uses.
    Delete {
        /// The dataset id, or a prefix of it that `recur datasets` shows.
        id: String,
    },
}

/// `recur gen`.
#[derive(Debug, Subcommand)]
pub enum GenCommand {
    /// The tutorial's ball positions: uniform motion, one row per line.
    Ball {
        /// Rows to generate.
        #[arg(long, default_value_t = 10_000)]
        rows: usize,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Shortest row (values, target included).
        #[arg(long, default_value_t = 5)]
        min_len: usize,
        /// Longest row.
        #[arg(long, default_value_t = 10)]
        max_len: usize,
        /// Output file.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// A daily series with a header: `date,temp,demand,price`, demand driven by a weekly cycle
    /// and the previous day's temperature, a few cells missing. Train on it with
    /// `--features temp,demand --targets demand --window 14 --drop-missing --order-by date`.
    Series {
        /// Days to generate.
        #[arg(long, default_value_t = 2000)]
        steps: usize,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Days with a missing cell, per thousand.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=1000))]
        missing_per_mille: u32,
        /// Output file.
        #[arg(short, long)]
        output: PathBuf,
    },
}

/// Recurrent cells.
#[derive(Debug, Clone, Copy, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum ModelArg {
    /// `nn.RNN(nonlinearity="tanh")`.
    RnnTanh,
    /// `nn.RNN(nonlinearity="relu")`.
    RnnRelu,
    /// `nn.LSTM`.
    Lstm,
    /// `nn.GRU`.
    Gru,
}

/// Optimizers.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OptimizerArg {
    /// SGD.
    Sgd,
    /// Adam.
    Adam,
    /// AdamW.
    Adamw,
    /// Adadelta.
    Adadelta,
}

/// `recur train`. Every setting comes from, in order: its flag, the `--spec` file, the
/// coordinator's default (the tutorial's where it has one).
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// CSV file: one sequence per line, the last value is the target (uploaded first).
    #[arg(conflicts_with = "dataset")]
    pub file: Option<PathBuf>,
    /// Train on a dataset already uploaded: its id, or a prefix of it that `recur datasets`
    /// shows.
    #[arg(long)]
    pub dataset: Option<String>,
    /// A job spec (JSON, the proto3 JSON form of `recur.v1.JobSpec`, as `--print-spec` writes
    /// it): any field, flags override it.
    #[arg(long, value_name = "FILE")]
    pub spec: Option<PathBuf>,
    /// Print the job spec this command would submit (the `--spec` format) and exit.
    #[arg(long)]
    pub print_spec: bool,
    /// Fine-tune: start from this job's best parameters instead of a fresh initialisation
    /// (the model must be that job's; without model flags it is taken from it).
    #[arg(long, value_name = "JOB")]
    pub init_from: Option<String>,
    /// Recurrent cell (default rnn_tanh).
    #[arg(long, value_enum)]
    pub model: Option<ModelArg>,
    /// Hidden units per layer (default 8).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub hidden: Option<u32>,
    /// Stacked layers (default 1).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub layers: Option<u32>,
    /// Run each layer in both directions (`--bidirectional=false` turns off a spec file's).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub bidirectional: Option<bool>,
    /// Hidden widths of the head, comma-separated (`--head 32,16`: Linear → ReLU → Linear →
    /// ReLU → Linear; at most 4); default one linear layer.
    #[arg(long, value_delimiter = ',', value_name = "WIDTHS",
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub head: Option<Vec<u32>>,
    /// Dropout after each hidden layer of the head, in training (0 to below 1; default 0).
    #[arg(long, value_name = "P")]
    pub dropout: Option<f32>,
    /// Optimizer (default adam).
    #[arg(long, value_enum)]
    pub optimizer: Option<OptimizerArg>,
    /// Learning rate (default 0.01; 1.0 for Adadelta).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Rows per batch (default 100).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: Option<u32>,
    /// Most epochs (default 10000).
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Stop after this many epochs without a better validation accuracy (default 100).
    #[arg(long)]
    pub patience: Option<u64>,
    /// Stop once validation accuracy reaches this.
    #[arg(long)]
    pub target_accuracy: Option<f64>,
    /// Divide values by this, or `auto` for the largest magnitude (default 50 for rows); or
    /// `standard` / `minmax`, fitted per column on the training split (the default for a
    /// series).
    #[arg(long)]
    pub scale: Option<String>,
    /// What to minimise: `mse` (default) or `bce` for 0/1 targets (the default with `--label`).
    #[arg(long, value_enum)]
    pub loss: Option<LossArg>,
    /// Seed of initialisation, split and batch order (default 0).
    #[arg(long)]
    pub seed: Option<u64>,
    /// A name for the job (default: the file's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Submit and return without watching.
    #[arg(long)]
    pub detach: bool,
    /// The series layout.
    #[command(flatten)]
    pub series: SeriesArgs,
}

/// `recur train`'s series flags: any of them uploads the file as a series (a header, one time
/// step per line) and cuts it into windows by time.
#[derive(Debug, Args)]
#[command(next_help_heading = "Series (a CSV with a header, one time step per line)")]
pub struct SeriesArgs {
    /// Treat the file as a series (implied by the flags below).
    #[arg(long)]
    pub series: bool,
    /// Feature columns, in order (comma-separated names from the header).
    #[arg(long, value_delimiter = ',', value_name = "COLUMNS")]
    pub features: Vec<String>,
    /// Target columns (may also be features).
    #[arg(long, alias = "target", value_delimiter = ',', value_name = "COLUMNS")]
    pub targets: Vec<String>,
    /// Steps per sample (default 1).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub window: Option<u32>,
    /// Steps between consecutive samples' starts (default 1).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub stride: Option<u32>,
    /// Predict the targets this many steps after a window's last step (default 1; 0 reads them at
    /// the last step).
    #[arg(long)]
    pub horizon: Option<u32>,
    /// Leave out steps with a missing value (empty, `null`, `NaN`) instead of refusing the file.
    #[arg(long)]
    pub drop_missing: bool,
    /// Sort the steps by this column first (e.g. a date).
    #[arg(long, value_name = "COLUMN")]
    pub order_by: Option<String>,
    /// A fixed divisor for a column instead of `--scale` (repeatable).
    #[arg(long, value_name = "COLUMN=DIVISOR")]
    pub column_scale: Vec<String>,
    /// Turn the targets into 0/1 labels: `rises` is 1 when a target is higher `--horizon`
    /// steps after the window than at its end (trains with `--loss bce`).
    #[arg(long, value_enum)]
    pub label: Option<LabelArg>,
    /// A target (or label) at every step of a window, each `--horizon` steps after its step,
    /// instead of one after the window's last step.
    #[arg(long)]
    pub every_step: bool,
    /// Stateful training (truncated backpropagation through time) over the series in order, in
    /// this many streams: the training part is cut into STREAMS contiguous spans, each step
    /// trains the next window of every span from the state its previous window ended with.
    /// Implies `--every-step` and a stride of one window (consecutive windows).
    #[arg(long, value_name = "STREAMS", value_parser = clap::value_parser!(u32).range(1..))]
    pub stateful: Option<u32>,
}

/// Label rules.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LabelArg {
    /// Higher after the horizon than at the window's end.
    Rises,
}

/// Losses.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LossArg {
    /// Mean squared error (regression).
    Mse,
    /// Binary cross-entropy with logits on 0/1 targets (classification).
    Bce,
}

/// `recur predict`.
#[derive(Debug, Args)]
pub struct PredictArgs {
    /// The job id.
    pub job: String,
    /// A history like `1,3,5,7`, or `-` to read one history per line from stdin.
    #[arg(allow_hyphen_values = true, required_unless_present_any = ["interactive", "stream"])]
    pub history: Option<String>,
    /// Ask for histories at a prompt until Ctrl-D, like the tutorial.
    #[arg(long, conflicts_with = "history")]
    pub interactive: bool,
    /// Stateful: read steps from stdin (one or more per line, `;` between steps), print the
    /// prediction after each, the state kept on the coordinator between lines.
    #[arg(long, conflicts_with_all = ["history", "interactive"])]
    pub stream: bool,
    /// With `--stream`: continue this session (its id is printed at the start) instead of
    /// opening a new one.
    #[arg(long, requires = "stream", value_name = "ID")]
    pub session: Option<String>,
}

/// `recur checkpoint`.
#[derive(Debug, Args)]
pub struct CheckpointArgs {
    /// The job id.
    pub job: String,
    /// The most recent epoch instead of the best.
    #[arg(long)]
    pub latest: bool,
    /// Output file (`.safetensors`); the manifest goes beside it as `.json`.
    #[arg(short, long)]
    pub output: PathBuf,
}
