//! A state_dict saved by PyTorch (`safetensors.torch.save_file(model.state_dict(), ...)`, see
//! `golden/gen_golden.py`, `tutorial_state_dict()`) loads and predicts what PyTorch predicts.

use std::path::PathBuf;

use candle_core::Device;
use recur_core::checkpoint::load_state_dict;
use recur_core::model::{ModelConfig, ModelKind, SeqModel};
use recur_core::step::{Batch, predict};

fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

#[test]
fn pytorch_state_dict_loads_and_predicts() {
    let params = load_state_dict(
        &golden().join("pytorch_tutorial.safetensors"),
        ModelConfig::tutorial(),
        &Device::Cpu,
    )
    .unwrap();
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(golden().join("pytorch_tutorial.json")).unwrap())
            .unwrap();
    let scale = expected["scale"].as_f64().unwrap() as f32;
    let histories: Vec<Vec<f32>> = expected["histories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            h.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32 / scale)
                .collect()
        })
        .collect();
    let inputs: Vec<&[f32]> = histories.iter().map(Vec::as_slice).collect();
    let batch = Batch::from_inputs(&inputs, 1, &Device::Cpu).unwrap();
    let got = predict(&SeqModel::new(params), &batch).unwrap();
    for (g, want) in got.iter().zip(expected["predictions"].as_array().unwrap()) {
        let want = want.as_f64().unwrap() as f32;
        assert!((g * scale - want).abs() < 1e-4, "{} vs {want}", g * scale);
    }
}

#[test]
fn a_state_dict_for_another_model_is_refused_by_name() {
    let lstm = ModelConfig {
        kind: ModelKind::Lstm,
        ..ModelConfig::tutorial()
    };
    let err = load_state_dict(
        &golden().join("pytorch_tutorial.safetensors"),
        lstm,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("pytorch_tutorial.safetensors") && err.contains("shape"),
        "{err}"
    );
    let wider = ModelConfig {
        hidden_size: 9,
        ..ModelConfig::tutorial()
    };
    let err = load_state_dict(
        &golden().join("pytorch_tutorial.safetensors"),
        wider,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("rnn.weight_hh_l0") || err.contains("linear.weight"),
        "{err}"
    );
}
