//! recur's optimizers and plateau schedule against `torch.optim`, from the values written by
//! `golden/gen_golden.py` (functions `optim()` and `plateau()`):
//!
//! ```python
//! p = torch.tensor(p0, requires_grad=True); opt = cls([p], **kwargs)
//! for g in grads:
//!     p.grad = torch.tensor(g); opt.step(); steps.append(p.detach().tolist())
//! ```

use std::path::PathBuf;

use recur_core::optim::{LrSchedule, LrScheduler, Optimizer, OptimizerConfig};
use serde_json::Value;

fn golden(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn f(v: &Value, key: &str, default: f64) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(default)
}

fn config(optimizer: &str, kw: &Value) -> OptimizerConfig {
    let lr = f(kw, "lr", 0.0);
    match optimizer {
        "SGD" => OptimizerConfig::Sgd {
            lr,
            momentum: f(kw, "momentum", 0.0),
            dampening: f(kw, "dampening", 0.0),
            weight_decay: f(kw, "weight_decay", 0.0),
            nesterov: kw.get("nesterov").and_then(Value::as_bool).unwrap_or(false),
        },
        "Adam" => OptimizerConfig::Adam {
            lr,
            beta1: f(kw, "beta1", 0.9),
            beta2: f(kw, "beta2", 0.999),
            eps: f(kw, "eps", 1e-8),
            weight_decay: f(kw, "weight_decay", 0.0),
        },
        "AdamW" => OptimizerConfig::AdamW {
            lr,
            beta1: f(kw, "beta1", 0.9),
            beta2: f(kw, "beta2", 0.999),
            eps: f(kw, "eps", 1e-8),
            weight_decay: f(kw, "weight_decay", 0.01),
        },
        "Adadelta" => OptimizerConfig::Adadelta {
            lr,
            rho: f(kw, "rho", 0.9),
            eps: f(kw, "eps", 1e-6),
            weight_decay: f(kw, "weight_decay", 0.0),
        },
        other => panic!("unknown optimizer {other}"),
    }
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn optimizers_match_torch_over_three_steps() {
    let g = golden("optim.json");
    let p0 = floats(&g["params"]);
    let grads: Vec<Vec<f32>> = g["grads"].as_array().unwrap().iter().map(floats).collect();
    let cases = g["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 9);
    for (name, case) in cases {
        let config = config(case["optimizer"].as_str().unwrap(), &case["kwargs"]);
        let mut opt = Optimizer::new(config, p0.len()).unwrap();
        let mut p = p0.clone();
        for (k, (grad, expected)) in grads
            .iter()
            .zip(case["steps"].as_array().unwrap())
            .enumerate()
        {
            opt.step(&mut p, grad).unwrap();
            for (got, want) in p.iter().zip(floats(expected)) {
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{name} step {}: {p:?} vs torch {expected}",
                    k + 1
                );
            }
        }
    }
}

#[test]
fn reduce_on_plateau_matches_torch() {
    let g = golden("plateau.json");
    let schedule = LrSchedule::Plateau {
        factor: f(&g, "factor", 0.0),
        patience: g["patience"].as_u64().unwrap() as u32,
        threshold: 1e-4,
        cooldown: g["cooldown"].as_u64().unwrap() as u32,
        min_lr: f(&g, "min_lr", 0.0),
    };
    let mut s = LrScheduler::new(schedule, 1.0).unwrap();
    let losses = g["losses"].as_array().unwrap();
    let lrs = g["lrs"].as_array().unwrap();
    let got: Vec<f64> = losses
        .iter()
        .map(|l| s.epoch_end(l.as_f64().unwrap()))
        .collect();
    let want: Vec<f64> = lrs.iter().map(|l| l.as_f64().unwrap()).collect();
    assert_eq!(got, want);
    // The fixture does reduce, several times, down to the floor.
    assert!(want.iter().any(|&lr| lr < 1.0) && want.contains(&0.1));
}
