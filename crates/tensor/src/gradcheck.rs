//! Finite-difference gradient checking, public so that every crate's tests (a whole-model
//! check in the model crate, say) use the same procedure as the op tests.

use crate::{Parameter, Result, Tensor};

/// Compares the autograd gradient of `f` at each input with central differences of step `h`,
/// returning the worst error relative to `1 + |gradient|`.
///
/// The output is projected onto fixed random weights (so every output element matters) and
/// the projection is accumulated in f64; the forward itself runs in f32, so choose `h` large
/// enough that f32 rounding (about 1e-7 of the output's size, divided by `h`) stays small.
pub fn check_gradients(
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    h: f64,
) -> Result<f64> {
    let params: Vec<Parameter> = inputs.iter().map(|t| Parameter::new(t.clone())).collect();
    let tracked: Vec<Tensor> = params.iter().map(|p| p.tensor()).collect();
    let out = f(&tracked)?;
    let w = Tensor::randn(out.shape(), 0.0, 1.0, 99);
    out.mul(&w)?.sum_all()?.backward()?;
    let wv = w.to_f64_vec();
    let eval = |xs: &[Tensor]| -> Result<f64> {
        let o = f(xs)?.to_f64_vec();
        Ok(o.iter().zip(&wv).map(|(a, b)| a * b).sum())
    };
    let mut worst = 0.0f64;
    for (pi, p) in params.iter().enumerate() {
        let analytic = p
            .grad()
            .map(|g| g.to_f64_vec())
            .unwrap_or_else(|| vec![0.0; inputs[pi].numel()]);
        let base: Vec<f32> = inputs[pi].f32_data()?.into_owned();
        for j in 0..base.len() {
            let probe = |delta: f64| -> Result<f64> {
                let mut v = base.clone();
                v[j] = (f64::from(base[j]) + delta) as f32;
                let mut xs = inputs.to_vec();
                xs[pi] = Tensor::from_vec(v, inputs[pi].shape())?;
                eval(&xs)
            };
            let numeric = (probe(h)? - probe(-h)?) / (2.0 * h);
            let err = (numeric - analytic[j]).abs() / (1.0 + numeric.abs().max(analytic[j].abs()));
            worst = worst.max(err);
        }
    }
    Ok(worst)
}
