//! The `recur` command line: every subcommand, its output (text or `--json`) and its errors
//! (one line, a hint, a non-zero exit). One module per command group: [`jobs`] (train, list,
//! status, watch, cancel, plot), [`predict`] (predictions, checkpoint downloads), [`cluster`]
//! (local, worker, workers, gen), [`demo`], [`bench`]; output formatting lives apart, in
//! [`text`] and [`json`].

mod args;
mod bench;
mod cluster;
mod demo;
mod error;
mod jobs;
mod json;
mod plot;
mod predict;
mod progress;
mod text;

pub use args::{Cli, Command};
pub use error::{CliError, exit};

use args::{DatasetsCommand, GenCommand};
use recur_core::data::{BallConfig, SeriesConfig};

use crate::Client;
use error::Result;

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<()> {
    let tls = match &cli.tls_ca {
        Some(ca) => Some(
            recur_worker::client_tls(
                ca,
                cli.tls_cert.as_deref().zip(cli.tls_key.as_deref()),
                cli.tls_domain.as_deref(),
            )
            .map_err(|e| CliError::new(e.to_string(), "check the --tls-* files"))?,
        ),
        None => None,
    };
    let connect = || Client::connect_with(&cli.coordinator, cli.token.as_deref(), tls.clone());
    let as_json = cli.json;
    match cli.command {
        Command::Demo(args) => demo::run(args, as_json).await,
        Command::Bench(args) => bench::run(args, as_json).await,
        Command::Local(args) => cluster::local(args).await,
        Command::Worker(args) => cluster::worker(args, cli.coordinator.clone(), tls).await,
        Command::Gen(GenCommand::Ball {
            rows,
            seed,
            min_len,
            max_len,
            output,
        }) => {
            let config = BallConfig {
                rows,
                seed,
                min_len,
                max_len,
                ..BallConfig::tutorial(seed)
            };
            cluster::gen_ball(config, output, as_json)
        }
        Command::Gen(GenCommand::Series {
            steps,
            seed,
            missing_per_mille,
            output,
        }) => cluster::gen_series(
            SeriesConfig {
                steps,
                seed,
                missing_per_mille,
            },
            output,
            as_json,
        ),
        Command::Train(args) if args.print_spec => {
            let mut client = match args.dataset {
                Some(_) => Some(connect().await?),
                None => None,
            };
            jobs::print_spec(client.as_mut(), *args).await
        }
        Command::Train(args) => jobs::train(&mut connect().await?, *args, as_json).await,
        Command::Jobs => jobs::list(&mut connect().await?, as_json).await,
        Command::Status { job } => jobs::status(&mut connect().await?, &job, as_json).await,
        Command::Watch { job } => jobs::follow(&mut connect().await?, &job, as_json).await,
        Command::Cancel { job } => jobs::cancel(&mut connect().await?, &job, as_json).await,
        Command::Delete { job } => jobs::delete(&mut connect().await?, &job, as_json).await,
        Command::Datasets { command } => match command {
            None | Some(DatasetsCommand::List) => {
                jobs::datasets(&mut connect().await?, as_json).await
            }
            Some(DatasetsCommand::Delete { id }) => {
                jobs::delete_dataset(&mut connect().await?, &id, as_json).await
            }
        },
        Command::Workers => cluster::workers(&mut connect().await?, as_json).await,
        Command::Predict(args) => predict::predict(&mut connect().await?, args, as_json).await,
        Command::Checkpoint(args) => {
            predict::checkpoint(&mut connect().await?, args, as_json).await
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "recur", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?;
            Ok(())
        }
        Command::Plot { job, output } => {
            jobs::plot(&mut connect().await?, &job, &output, as_json).await
        }
    }
}
