//! Reverse-mode automatic differentiation.
//!
//! An op whose inputs track gradients (and that runs outside [`no_grad`]) records a [`Node`]: its
//! inputs and a closure that maps the output's gradient to one gradient per input. The closure is
//! written next to the op's forward, in the op's own module. [`Tensor::backward`] walks the graph
//! in reverse topological order; gradients for trainable [`Parameter`]s accumulate in their cell
//! across backward calls until [`Parameter::zero_grad`].
//!
//! Untracked tensors (constants, data, frozen models in no-grad mode) never build nodes: the only
//! cost of tracking when it is off is one flag check per op.

use crate::tensor::{GradTrack, Tensor};
use crate::{Error, Result};
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

/// Maps the gradient of an op's output to the gradients of its inputs (`None`: no gradient).
pub(crate) type BackwardFn = Box<dyn Fn(&Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync>;

/// One recorded op in the graph.
pub(crate) struct Node {
    pub(crate) op: &'static str,
    pub(crate) inputs: Vec<Tensor>,
    pub(crate) backward: BackwardFn,
}

/// Where a leaf's gradient accumulates.
#[derive(Default)]
pub(crate) struct GradCell {
    pub(crate) grad: Mutex<Option<Tensor>>,
}

thread_local! {
    static NO_GRAD: Cell<bool> = const { Cell::new(false) };
}

/// True inside [`no_grad`] on this thread.
pub fn is_no_grad() -> bool {
    NO_GRAD.with(|c| c.get())
}

/// Runs `f` with gradient tracking off on this thread: ops record nothing, so frozen models
/// (the reference policy, the reward model) cost no more than plain inference.
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    let _guard = NoGradGuard::new();
    f()
}

/// Turns tracking off until dropped (restoring the previous mode).
pub struct NoGradGuard {
    previous: bool,
}

impl NoGradGuard {
    pub fn new() -> Self {
        NoGradGuard {
            previous: NO_GRAD.with(|c| c.replace(true)),
        }
    }
}

impl Default for NoGradGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        NO_GRAD.with(|c| c.set(self.previous));
    }
}

/// A trainable tensor: its current value (a graph leaf) and the gradient accumulated for it.
///
/// Cloning a `Parameter` shares it (the same value and gradient cell), like an `Arc`.
#[derive(Clone)]
pub struct Parameter {
    inner: Arc<ParameterInner>,
}

struct ParameterInner {
    value: RwLock<Tensor>,
    cell: Arc<GradCell>,
}

impl Parameter {
    /// A parameter holding `value`'s data (detached from any graph).
    pub fn new(value: Tensor) -> Parameter {
        let cell = Arc::new(GradCell::default());
        let leaf = value.with_track(GradTrack::Leaf(cell.clone()));
        Parameter {
            inner: Arc::new(ParameterInner {
                value: RwLock::new(leaf),
                cell,
            }),
        }
    }

    /// The current value, tracked: ops on it record the graph (outside no-grad mode).
    pub fn tensor(&self) -> Tensor {
        self.inner
            .value
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn shape(&self) -> Vec<usize> {
        self.tensor().shape().to_vec()
    }

    /// Replaces the value (an optimizer step); the shape and dtype must stay the same.
    pub fn set(&self, value: &Tensor) -> Result<()> {
        let mut slot = self.inner.value.write().unwrap_or_else(|e| e.into_inner());
        if value.shape() != slot.shape() || value.dtype() != slot.dtype() {
            return Err(Error::invalid(
                "Parameter::set",
                format!(
                    "new value {:?} {} does not match the parameter's {:?} {}",
                    value.shape(),
                    value.dtype(),
                    slot.shape(),
                    slot.dtype()
                ),
            ));
        }
        *slot = value.with_track(GradTrack::Leaf(self.inner.cell.clone()));
        Ok(())
    }

    /// The gradient accumulated since the last [`Parameter::zero_grad`], if any.
    pub fn grad(&self) -> Option<Tensor> {
        self.inner
            .cell
            .grad
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Overwrites the accumulated gradient (gradient clipping, tests).
    pub fn set_grad(&self, grad: Option<Tensor>) {
        *self
            .inner
            .cell
            .grad
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = grad;
    }

    pub fn zero_grad(&self) {
        self.set_grad(None);
    }

    /// True when both handles refer to the same parameter.
    pub fn same(&self, other: &Parameter) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl std::fmt::Debug for Parameter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = self.tensor();
        write!(f, "Parameter({:?}, {})", t.shape(), t.dtype())
    }
}

/// Every op node reachable from `root`, inputs before the ops that consume them.
fn topological_order(root: &Tensor) -> Vec<Tensor> {
    let mut order = Vec::new();
    let mut visited: HashMap<u64, ()> = HashMap::new();
    // Iterative DFS: GPT graphs are deep enough to overflow a recursive walk's stack.
    let mut stack: Vec<(Tensor, bool)> = vec![(root.clone(), false)];
    while let Some((t, expanded)) = stack.pop() {
        if expanded {
            order.push(t);
            continue;
        }
        if visited.insert(t.id(), ()).is_some() {
            continue;
        }
        if let GradTrack::Op(node) = t.track() {
            stack.push((t.clone(), true));
            for input in node.inputs.iter().rev() {
                if input.tracks_grad() && !visited.contains_key(&input.id()) {
                    stack.push((input.clone(), false));
                }
            }
        }
    }
    order
}

pub(crate) fn backward(root: &Tensor, seed: Tensor) -> Result<()> {
    if !root.tracks_grad() {
        return Err(Error::invalid(
            "backward",
            "the tensor does not depend on any parameter (or was computed in no-grad mode)",
        ));
    }
    if seed.shape() != root.shape() {
        return Err(Error::ShapeMismatch {
            op: "backward",
            lhs: root.shape().to_vec(),
            rhs: seed.shape().to_vec(),
        });
    }
    let _guard = NoGradGuard::new();
    if let GradTrack::Leaf(cell) = root.track() {
        let mut slot = cell.grad.lock().unwrap_or_else(|e| e.into_inner());
        *slot = Some(match slot.take() {
            Some(prev) => prev.add(&seed)?,
            None => seed.contiguous()?,
        });
        return Ok(());
    }
    let mut grads: HashMap<u64, Tensor> = HashMap::new();
    let mut leaf_grads: HashMap<usize, (Arc<GradCell>, Tensor)> = HashMap::new();
    grads.insert(root.id(), seed);
    for t in topological_order(root).into_iter().rev() {
        let Some(grad) = grads.remove(&t.id()) else {
            continue;
        };
        let GradTrack::Op(node) = t.track() else {
            continue;
        };
        let input_grads = (node.backward)(&grad)?;
        debug_assert_eq!(input_grads.len(), node.inputs.len(), "{}", node.op);
        for (input, g) in node.inputs.iter().zip(input_grads) {
            let Some(g) = g else { continue };
            if g.shape() != input.shape() {
                return Err(Error::invalid(
                    "backward",
                    format!(
                        "{} produced a gradient of shape {:?} for an input of shape {:?}",
                        node.op,
                        g.shape(),
                        input.shape()
                    ),
                ));
            }
            match input.track() {
                GradTrack::None => {}
                GradTrack::Leaf(cell) => {
                    // Sum this pass's contributions first and add them to the stored gradient
                    // once, so n backward calls give exactly n times one call's gradient.
                    let key = Arc::as_ptr(cell) as usize;
                    let acc = match leaf_grads.remove(&key) {
                        Some((_, prev)) => prev.add(&g)?,
                        None => g,
                    };
                    leaf_grads.insert(key, (cell.clone(), acc));
                }
                GradTrack::Op(_) => {
                    let acc = match grads.remove(&input.id()) {
                        Some(prev) => prev.add(&g)?,
                        None => g,
                    };
                    grads.insert(input.id(), acc);
                }
            }
        }
    }
    for (cell, g) in leaf_grads.into_values() {
        let mut slot = cell.grad.lock().unwrap_or_else(|e| e.into_inner());
        *slot = Some(match slot.take() {
            Some(prev) => prev.add(&g)?,
            None => g.contiguous()?,
        });
    }
    Ok(())
}
