//! The single-process trainer on generated ball data (the tutorial's task): RNN tanh, hidden 8,
//! with the default recipe (Adam, plateau halving) beats the tutorial's 0.9275 test accuracy.

use std::ops::ControlFlow;

use candle_core::Device;
use recur_core::data::BallConfig;
use recur_core::train::{StopReason, TrainConfig, Trainer};

#[test]
fn rnn_tanh_reaches_the_tutorial_accuracy_and_beyond() {
    let data = BallConfig::tutorial(11).generate().unwrap();
    let config = TrainConfig {
        seed: 11,
        max_epochs: 1000,
        ..TrainConfig::default()
    };
    let trainer = Trainer::new(config, &data, &Device::Cpu).unwrap();
    let mut epochs = 0;
    let report = trainer
        .run(|r| {
            epochs += 1;
            if r.epoch % 50 == 0 {
                eprintln!(
                    "epoch {} loss {:.6} train {:.4} val {:.4} mae {:.4} lr {} {:.0} samples/s",
                    r.epoch,
                    r.train_loss,
                    r.train_accuracy,
                    r.validation.accuracy,
                    r.validation.mae,
                    r.lr,
                    r.samples_per_sec
                );
            }
            ControlFlow::Continue(())
        })
        .unwrap();
    eprintln!(
        "{:?} best epoch {} test {:?}",
        report.stop, report.best_epoch, report.test
    );
    assert_eq!(report.history.len(), epochs);
    assert!(
        report
            .history
            .windows(2)
            .all(|w| w[1].epoch == w[0].epoch + 1)
    );
    assert!(
        report.test.accuracy >= 0.95,
        "test accuracy {}",
        report.test.accuracy
    );
    assert!(report.test.mae <= 0.05, "test MAE {}", report.test.mae);
    assert_eq!(report.test.samples, 2000);
    assert_ne!(report.stop, StopReason::Cancelled);
    assert_eq!(report.best.manifest.epoch, report.best_epoch);
}
