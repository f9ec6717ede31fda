//! The fused layers against the per-step reference implementation on random packed batches:
//! every kind × 1-3 layers × uni/bidirectional, hidden 1-160, inputs of 1-3 features, lengths
//! 1-60 with long and short rows mixed, batches of 1-300 rows, a third of them under a head of
//! one or two hidden layers (widths 1-8, ReLU). Outputs at every step, h_n, c_n,
//! the head's output and the gradient of every parameter must agree.
//!
//! Tolerance: `|fused - reference| <= 1e-5 * |reference| + floor`. The relative part is the
//! bound asked of the kernels. The floor is there because each value is a sum computed in a
//! different order on each side (blocked matrix products, folded biases): where its terms
//! cancel, the rounding error is set by the size of the terms, not by the small sum left.
//! - Forward values (states, outputs, predictions) are sums of terms of order one (states in
//!   [-1, 1], PyTorch's initialisation keeps weights below 1/sqrt(fan-in)), which f32 carries to
//!   about 1e-7: their floor is `1e-6` absolute.
//! - A gradient entry sums up to batch × steps products of the back-propagated signal, whose
//!   size the largest entry of the model's whole gradient bounds, and those products carry the
//!   rounding of a backward recurrence through up to 60 steps and 3 layers: its floor is `3e-5`
//!   of that largest entry; the worst seen in random cases was 1.2e-5 of it, and a 1e-4 relative
//!   error in one term of one kernel (tried by hand) fails the test at once. (The largest entry
//!   of the entry's own tensor is no bound: a one-unit layer's `weight_hh` is a single number, a
//!   sum whose terms may cancel.)
//! - ReLU cells are the exception twice over. Their states are unbounded (values near 100 show up
//!   in random cases), so their forward floor is `1e-5` of the tensor's largest magnitude (at
//!   least the `1e-6` of the others). And
//!   ReLU's derivative jumps at zero: a pre-activation within rounding distance of it can take
//!   the other branch on the other side, and then gradient entries move by whole terms. Their
//!   gradients' floor is `1e-3` of the largest entry, which covers the small flips; a flip on a
//!   large back-propagated signal is not a kernel error and no floor would cover it. Of 27 random
//!   runs of 1,000 cases with these floors, two failed this way, one on the ReLU forward floor
//!   before its `1e-6` minimum, two with cases that went unrecorded; none recorded a failure on
//!   another kind. The fixed seed below meets none of these.

use candle_core::{Device, Tensor};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use recur_core::fused::squared_error;
use recur_core::model::{
    HeadLayers, ModelConfig, ModelKind, PackedBatch, Params, ReferenceModel, SeqModel,
};

#[derive(Debug, Clone)]
struct Case {
    config: ModelConfig,
    lengths: Vec<usize>,
    seed: u64,
}

fn kind() -> impl Strategy<Value = ModelKind> {
    prop::sample::select(ModelKind::ALL.to_vec())
}

/// Lengths mixing long and short rows: a few long ones among many short, or all alike.
fn lengths() -> impl Strategy<Value = Vec<usize>> {
    (1usize..=300, 1usize..=60, 0u8..3).prop_flat_map(|(b_sz, max_len, shape)| {
        let row = match shape {
            0 => (1..=max_len).boxed(),
            1 => prop_oneof![4 => 1..=max_len.min(3), 1 => max_len.max(1)..=max_len].boxed(),
            _ => Just(max_len).boxed(),
        };
        prop::collection::vec(row, b_sz)
    })
}

fn case() -> impl Strategy<Value = Case> {
    (
        kind(),
        1usize..=3,
        any::<bool>(),
        prop_oneof![3 => 1usize..=24, 1 => 25usize..=160],
        1usize..=3,
        1usize..=2,
        lengths(),
        any::<u64>(),
        prop_oneof![2 => Just(Vec::new()), 1 => prop::collection::vec(1usize..=8, 1..=2)],
    )
        .prop_map(
            |(
                kind,
                num_layers,
                bidirectional,
                hidden_size,
                input_size,
                output_size,
                lengths,
                seed,
                head,
            )| {
                Case {
                    config: ModelConfig {
                        kind,
                        input_size,
                        hidden_size,
                        num_layers,
                        bidirectional,
                        output_size,
                        head: HeadLayers::new(&head).unwrap(),
                    },
                    lengths,
                    seed,
                }
            },
        )
}

fn max_abs(t: &Tensor) -> f32 {
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

/// Compares a forward value: the floor is absolute, or relative to the tensor for ReLU cells.
fn close(case: &Case, what: &str, fused: &Tensor, reference: &Tensor) {
    let floor = if case.config.kind == ModelKind::RnnRelu {
        (1e-5 * max_abs(reference)).max(1e-6)
    } else {
        1e-6
    };
    close_within(case, what, fused, reference, floor);
}

/// Compares a gradient; `scale` is the largest entry of the model's whole gradient.
fn close_grad(case: &Case, what: &str, fused: &Tensor, reference: &Tensor, scale: f32) {
    let floor = if case.config.kind == ModelKind::RnnRelu {
        1e-3 * scale
    } else {
        3e-5 * scale
    };
    close_within(case, what, fused, reference, floor);
}

fn close_within(case: &Case, what: &str, fused: &Tensor, reference: &Tensor, floor: f32) {
    assert_eq!(fused.dims(), reference.dims(), "{case:?}: {what} shape");
    let f = fused.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let r = reference.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (k, (a, b)) in f.iter().zip(&r).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs() + floor,
            "{:?} layers {} bi {} hidden {} input {}, {} rows up to {} steps: {what}[{k}] fused {a} \
             reference {b} (floor {floor})",
            case.config.kind,
            case.config.num_layers,
            case.config.bidirectional,
            case.config.hidden_size,
            case.config.input_size,
            case.lengths.len(),
            case.lengths.iter().max().unwrap(),
        );
    }
}

fn check(case: &Case) {
    let mut rng = ChaCha8Rng::seed_from_u64(case.seed);
    let c = case.config;
    let seqs: Vec<Vec<f32>> = case
        .lengths
        .iter()
        .map(|&len| {
            (0..len * c.input_size)
                .map(|_| rng.random_range(-2.0f32..2.0))
                .collect()
        })
        .collect();
    let refs: Vec<&[f32]> = seqs.iter().map(Vec::as_slice).collect();
    let batch = PackedBatch::new(&refs, c.input_size, &Device::Cpu).unwrap();
    let targets: Vec<f32> = (0..case.lengths.len() * c.output_size)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let flat = Params::init(c, case.seed, &Device::Cpu)
        .unwrap()
        .to_flat()
        .unwrap();
    let fused = SeqModel::new(Params::from_flat(c, &flat, &Device::Cpu).unwrap());
    let reference = ReferenceModel::new(Params::from_flat(c, &flat, &Device::Cpu).unwrap());

    let f = fused.forward(&batch, true).unwrap();
    let r = reference.forward(&batch, true).unwrap();
    close(case, "y", &f.ys, &r.ys);
    assert_eq!(f.h_n.len(), r.h_n.len());
    for (k, (a, b)) in f.h_n.iter().zip(&r.h_n).enumerate() {
        close(case, &format!("h_n[{k}]"), a, b);
    }
    assert_eq!(f.c_n.len(), r.c_n.len());
    for (k, (a, b)) in f.c_n.iter().zip(&r.c_n).enumerate() {
        close(case, &format!("c_n[{k}]"), a, b);
    }
    assert_eq!(f.outputs.len(), r.outputs.len());
    for (t, (a, b)) in f.outputs.iter().zip(&r.outputs).enumerate() {
        close(case, &format!("output at step {t}"), a, b);
    }

    let sorted = batch.sort_values(&targets, c.output_size);
    let t = Tensor::from_vec(sorted, f.ys.shape(), &Device::Cpu).unwrap();
    let fused_grads = squared_error(&f.ys, &t).unwrap().backward().unwrap();
    let ref_loss =
        ((&r.ys - &t).unwrap().sqr().unwrap().sum_all().unwrap() / c.output_size as f64).unwrap();
    let ref_grads = ref_loss.backward().unwrap();
    let fg = fused.params().grads_named(&fused_grads).unwrap();
    let rg = reference.params().grads_named(&ref_grads).unwrap();
    let scale = rg.iter().fold(0f32, |m, (_, g)| m.max(max_abs(g)));
    for ((name, a), (_, b)) in fg.iter().zip(&rg) {
        close_grad(case, &format!("grad of {name}"), a, b, scale);
    }

    // The forward-only path gives the same predictions and builds no graph.
    let ys = fused.infer(&batch).unwrap();
    assert!(!ys.track_op());
    close(case, "inference y", &ys, &f.ys);
}

proptest! {
    // A fixed seed: CI sees the same 48 cases every run. A wider search is one edit away
    // (`RngSeed::Random`, more cases); see the module docs for what it finds with ReLU cells.
    #![proptest_config(ProptestConfig {
        cases: 48,
        rng_seed: RngSeed::Fixed(0x5eed),
        ..ProptestConfig::default()
    })]

    #[test]
    fn fused_layers_match_the_reference(case in case()) {
        check(&case);
    }
}

/// The corners the random cases may miss: one row of one step, one unit, and the largest
/// shapes of the range at once.
#[test]
fn corners() {
    for kind in ModelKind::ALL {
        for (hidden_size, num_layers, bidirectional, lengths) in [
            (1, 1, false, vec![1]),
            (1, 3, true, vec![1, 60, 1]),
            (160, 3, true, [60, 1, 17, 60, 2].repeat(60)),
        ] {
            check(&Case {
                config: ModelConfig {
                    kind,
                    input_size: 2,
                    hidden_size,
                    num_layers,
                    bidirectional,
                    output_size: 1,
                    head: Default::default(),
                },
                lengths,
                seed: 7,
            });
        }
    }
}
