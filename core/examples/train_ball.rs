//! Trains the tutorial's task in one process and prints every epoch: a quick way to try recipes.
//!
//! ```text
//! cargo run --release -p recur-core --example train_ball -- [CSV] \
//!     [--model gru] [--hidden 8] [--optimizer adam] [--lr 0.01] [--batch 100] \
//!     [--plateau-patience 10] [--epochs 500] [--target 0.99] [--seed 0] [--every 10]
//! ```
//! Without a CSV it generates the tutorial's ball data (10,000 rows).

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::ops::ControlFlow;
use std::time::Instant;

use candle_core::Device;
use recur_core::data::{BallConfig, CsvLimits, parse_csv};
use recur_core::optim::{LrSchedule, OptimizerConfig};
use recur_core::train::{TrainConfig, Trainer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mut config = TrainConfig::default();
    let mut csv = None;
    let (mut optimizer, mut lr) = ("adam".to_string(), 0.01);
    let mut every = 10;
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--model" => config.model.kind = value()?.parse()?,
            "--hidden" => config.model.hidden_size = value()?.parse()?,
            "--layers" => config.model.num_layers = value()?.parse()?,
            "--optimizer" => optimizer = value()?,
            "--lr" => lr = value()?.parse()?,
            "--batch" => config.batch_size = value()?.parse()?,
            "--plateau-patience" => config.schedule = LrSchedule::plateau(0.5, value()?.parse()?),
            "--constant" => config.schedule = LrSchedule::Constant,
            "--epochs" => config.max_epochs = value()?.parse()?,
            "--patience" => config.patience = value()?.parse()?,
            "--target" => config.target_accuracy = Some(value()?.parse()?),
            "--seed" => config.seed = value()?.parse()?,
            "--every" => every = value()?.parse()?,
            path => csv = Some(path.to_string()),
        }
    }
    config.optimizer = OptimizerConfig::by_name(&optimizer, lr)?;
    let data = match csv {
        Some(path) => parse_csv(&std::fs::read(&path)?, &path, &CsvLimits::default())?,
        None => BallConfig::tutorial(config.seed).generate()?,
    };
    let start = Instant::now();
    let report = Trainer::new(config, &data, &Device::Cpu)?.run(|r| {
        if r.epoch % every == 0 || r.epoch == 1 {
            println!(
                "epoch {:>5}  loss {:.3e}  train {:.4}  val {:.4}  mae {:.4}  exact {:.3}  lr {:.2e}  {:.0} samples/s  {:.1}s",
                r.epoch,
                r.train_loss,
                r.train_accuracy,
                r.validation.accuracy,
                r.validation.mae,
                r.validation.exact,
                r.lr,
                r.samples_per_sec,
                start.elapsed().as_secs_f64()
            );
        }
        ControlFlow::Continue(())
    })?;
    println!(
        "stopped ({:?}) after {} epochs in {:.1}s; best epoch {} (val {:.4}); test accuracy {:.4}, MAE {:.4}, exact {:.4}",
        report.stop,
        report.history.len(),
        start.elapsed().as_secs_f64(),
        report.best_epoch,
        report.best_validation.accuracy,
        report.test.accuracy,
        report.test.mae,
        report.test.exact
    );
    Ok(())
}
