//! What the PyTorch golden tests share.

/// Asserts `got` equals PyTorch's `expected` value by value, within `rel` of the larger of the
/// value and 1, naming the case, the quantity and the first index that differs.
pub fn assert_close(case: &str, what: &str, got: &[f32], expected: &[f32], rel: f32) {
    assert_eq!(got.len(), expected.len(), "{case}: {what} length");
    for (k, (g, e)) in got.iter().zip(expected).enumerate() {
        assert!(
            (g - e).abs() <= rel * e.abs().max(1.0),
            "{case}: {what}[{k}] = {g}, PyTorch says {e}"
        );
    }
}
