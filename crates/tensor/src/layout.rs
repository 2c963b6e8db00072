//! Shapes and strided layouts: how a tensor's logical indices map onto its storage.
//!
//! Every view (transpose, permute, narrow, broadcast, squeeze/unsqueeze and reshape of contiguous
//! data) is a new [`Layout`] over the same storage; nothing here copies elements.

use crate::{Error, Result};

/// Shape, element strides and element offset of a tensor over its storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
}

/// Row-major strides of a contiguous tensor with `shape`.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; shape.len()];
    let mut acc = 1;
    for (s, &d) in strides.iter_mut().zip(shape).rev() {
        *s = acc;
        acc *= d;
    }
    strides
}

/// The element count of `shape`, or `None` when the product of its nonzero dims overflows
/// `usize`. Such a shape cannot be laid out (its strides are products of dims), even when a
/// zero dim leaves it empty, so constructors and views refuse it.
pub fn checked_numel(shape: &[usize]) -> Option<usize> {
    let nonzero = shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
    Some(if shape.contains(&0) { 0 } else { nonzero })
}

/// Resolves a possibly negative dimension index (`-1` is the last) against `rank`.
pub fn resolve_dim(op: &'static str, dim: isize, shape: &[usize]) -> Result<usize> {
    let rank = shape.len() as isize;
    let d = if dim < 0 { dim + rank } else { dim };
    if d < 0 || d >= rank {
        return Err(Error::DimOutOfRange {
            op,
            dim,
            shape: shape.to_vec(),
        });
    }
    Ok(d as usize)
}

/// The NumPy broadcast of two shapes (aligned at the trailing dimension).
pub fn broadcast_shapes(op: &'static str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i + a.len() >= rank {
            a[i + a.len() - rank]
        } else {
            1
        };
        let db = if i + b.len() >= rank {
            b[i + b.len() - rank]
        } else {
            1
        };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => {
                return Err(Error::ShapeMismatch {
                    op,
                    lhs: a.to_vec(),
                    rhs: b.to_vec(),
                })
            }
        };
    }
    Ok(out)
}

impl Layout {
    /// A contiguous row-major layout starting at offset 0.
    pub fn contiguous(shape: &[usize]) -> Layout {
        Layout {
            strides: contiguous_strides(shape),
            shape: shape.to_vec(),
            offset: 0,
        }
    }

    /// A layout from raw parts; the caller guarantees it stays inside its storage.
    pub fn from_parts(shape: Vec<usize>, strides: Vec<usize>, offset: usize) -> Layout {
        debug_assert_eq!(shape.len(), strides.len());
        Layout {
            shape,
            strides,
            offset,
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    pub fn offset(&self) -> usize {
        self.offset
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the elements are laid out row-major without gaps (size-1 dims may have any stride).
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1;
        for (&d, &s) in self.shape.iter().zip(&self.strides).rev() {
            if d != 1 && s != expected {
                return false;
            }
            expected *= d;
        }
        true
    }

    /// One past the largest storage index this layout touches (0 for empty tensors).
    pub fn storage_extent(&self) -> usize {
        if self.numel() == 0 {
            return 0;
        }
        self.offset
            + self
                .shape
                .iter()
                .zip(&self.strides)
                .map(|(&d, &s)| (d - 1) * s)
                .sum::<usize>()
            + 1
    }

    /// Swaps two dimensions.
    pub fn transpose(&self, d0: isize, d1: isize) -> Result<Layout> {
        let a = resolve_dim("transpose", d0, &self.shape)?;
        let b = resolve_dim("transpose", d1, &self.shape)?;
        let mut l = self.clone();
        l.shape.swap(a, b);
        l.strides.swap(a, b);
        Ok(l)
    }

    /// Reorders dimensions: output dim i is input dim `perm[i]`.
    pub fn permute(&self, perm: &[usize]) -> Result<Layout> {
        let mut seen = vec![false; self.rank()];
        if perm.len() != self.rank() || perm.iter().any(|&p| p >= self.rank()) {
            return Err(Error::invalid(
                "permute",
                format!(
                    "{perm:?} is not a permutation of the dims of {:?}",
                    self.shape
                ),
            ));
        }
        for &p in perm {
            if std::mem::replace(&mut seen[p], true) {
                return Err(Error::invalid(
                    "permute",
                    format!("{perm:?} repeats dimension {p}"),
                ));
            }
        }
        Ok(Layout {
            shape: perm.iter().map(|&p| self.shape[p]).collect(),
            strides: perm.iter().map(|&p| self.strides[p]).collect(),
            offset: self.offset,
        })
    }

    /// Elements `start..start+len` of dimension `dim`.
    pub fn narrow(&self, dim: isize, start: usize, len: usize) -> Result<Layout> {
        let d = resolve_dim("narrow", dim, &self.shape)?;
        if start.checked_add(len).is_none_or(|end| end > self.shape[d]) {
            return Err(Error::invalid(
                "narrow",
                format!(
                    "range {start}..{} out of bounds for dim {d} of shape {:?}",
                    start.saturating_add(len),
                    self.shape
                ),
            ));
        }
        let mut l = self.clone();
        if len > 0 {
            l.offset += start * self.strides[d];
        }
        l.shape[d] = len;
        Ok(l)
    }

    /// Expands size-1 (or missing leading) dims to `shape` with stride 0.
    pub fn broadcast_to(&self, shape: &[usize]) -> Result<Layout> {
        let err = || Error::ShapeMismatch {
            op: "broadcast_to",
            lhs: self.shape.clone(),
            rhs: shape.to_vec(),
        };
        if shape.len() < self.rank() || checked_numel(shape).is_none() {
            return Err(err());
        }
        let lead = shape.len() - self.rank();
        let mut strides = vec![0; shape.len()];
        for i in 0..self.rank() {
            let (have, want) = (self.shape[i], shape[lead + i]);
            strides[lead + i] = if have == want {
                self.strides[i]
            } else if have == 1 {
                0
            } else {
                return Err(err());
            };
        }
        Ok(Layout {
            shape: shape.to_vec(),
            strides,
            offset: self.offset,
        })
    }

    /// Inserts a size-1 dimension at `dim` (which may equal the rank).
    pub fn unsqueeze(&self, dim: isize) -> Result<Layout> {
        let rank = self.rank() as isize + 1;
        let d = if dim < 0 { dim + rank } else { dim };
        if d < 0 || d >= rank {
            return Err(Error::DimOutOfRange {
                op: "unsqueeze",
                dim,
                shape: self.shape.clone(),
            });
        }
        let d = d as usize;
        let mut l = self.clone();
        let stride = if d < self.rank() {
            self.strides[d] * self.shape[d]
        } else {
            1
        };
        l.shape.insert(d, 1);
        l.strides.insert(d, stride);
        Ok(l)
    }

    /// Removes dimension `dim`, which must have size 1.
    pub fn squeeze(&self, dim: isize) -> Result<Layout> {
        let d = resolve_dim("squeeze", dim, &self.shape)?;
        if self.shape[d] != 1 {
            return Err(Error::invalid(
                "squeeze",
                format!(
                    "dim {d} of shape {:?} has size {}, not 1",
                    self.shape, self.shape[d]
                ),
            ));
        }
        let mut l = self.clone();
        l.shape.remove(d);
        l.strides.remove(d);
        Ok(l)
    }

    /// A view with a new shape when the data is contiguous; `None` when a copy is needed.
    pub fn reshape(&self, shape: &[usize]) -> Option<Layout> {
        if self.is_contiguous() {
            Some(Layout {
                shape: shape.to_vec(),
                strides: contiguous_strides(shape),
                offset: self.offset,
            })
        } else {
            None
        }
    }

    /// Visits the elements in row-major logical order as runs: `f(storage_start, len)` covers
    /// storage indices `storage_start..storage_start + len` when the innermost stride is 1, or
    /// single elements otherwise. Copies through this move whole rows at memcpy speed.
    pub fn for_each_run(&self, mut f: impl FnMut(usize, usize)) {
        if self.numel() == 0 {
            return;
        }
        if self.is_contiguous() {
            return f(self.offset, self.numel());
        }
        let rank = self.rank();
        if self.strides[rank - 1] != 1 {
            return self.for_each_index(|i| f(i, 1));
        }
        let inner = self.shape[rank - 1];
        let outer = Layout {
            shape: self.shape[..rank - 1].to_vec(),
            strides: self.strides[..rank - 1].to_vec(),
            offset: self.offset,
        };
        if outer.rank() == 0 {
            return f(self.offset, inner);
        }
        outer.for_each_index(|start| f(start, inner));
    }

    /// The elements of `src` under this layout, in row-major logical order.
    pub fn gather<T: Copy>(&self, src: &[T]) -> Vec<T> {
        let mut out = Vec::with_capacity(self.numel());
        self.for_each_run(|start, len| out.extend_from_slice(&src[start..start + len]));
        out
    }

    /// As [`Layout::gather`] for f32, into a buffer from the CPU pool (`crate::cpu::pool`).
    pub fn gather_f32(&self, src: &[f32]) -> Vec<f32> {
        let mut out = crate::cpu::pool::for_overwrite(self.numel());
        let mut k = 0;
        // The runs cover the layout's elements exactly once, in order: every element of `out`
        // is written.
        self.for_each_run(|start, len| {
            out[k..k + len].copy_from_slice(&src[start..start + len]);
            k += len;
        });
        debug_assert_eq!(k, out.len());
        out
    }

    /// Writes `values` (row-major logical order) into `dst` at this layout's positions.
    pub fn scatter<T: Copy>(&self, values: &[T], dst: &mut [T]) {
        let mut k = 0;
        self.for_each_run(|start, len| {
            dst[start..start + len].copy_from_slice(&values[k..k + len]);
            k += len;
        });
    }

    /// Visits the storage index of every element in row-major logical order.
    pub fn for_each_index(&self, mut f: impl FnMut(usize)) {
        if self.numel() == 0 {
            return;
        }
        if self.is_contiguous() {
            for i in 0..self.numel() {
                f(self.offset + i);
            }
            return;
        }
        let rank = self.rank();
        let mut idx = vec![0usize; rank];
        let mut pos = self.offset;
        let (inner_len, inner_stride) = (self.shape[rank - 1], self.strides[rank - 1]);
        loop {
            for j in 0..inner_len {
                f(pos + j * inner_stride);
            }
            // Advance the outer dims like an odometer.
            let mut d = rank - 1;
            loop {
                if d == 0 {
                    return;
                }
                d -= 1;
                idx[d] += 1;
                pos += self.strides[d];
                if idx[d] < self.shape[d] {
                    break;
                }
                pos -= self.strides[d] * self.shape[d];
                idx[d] = 0;
            }
        }
    }
}

/// Resolves a shape with at most one `-1` against `numel`.
pub fn infer_shape(op: &'static str, numel: usize, shape: &[isize]) -> Result<Vec<usize>> {
    let mut infer = None;
    for (i, &d) in shape.iter().enumerate() {
        if d == -1 {
            if infer.replace(i).is_some() {
                return Err(Error::invalid(op, format!("more than one -1 in {shape:?}")));
            }
        } else if d < 0 {
            return Err(Error::invalid(op, format!("negative size in {shape:?}")));
        }
    }
    let given: Vec<usize> = shape
        .iter()
        .filter(|&&d| d >= 0)
        .map(|&d| d as usize)
        .collect();
    let known = checked_numel(&given).ok_or_else(|| {
        Error::invalid(
            op,
            format!("the sizes in {shape:?} overflow the element count"),
        )
    })?;
    let mut out: Vec<usize> = shape.iter().map(|&d| d.max(0) as usize).collect();
    if let Some(i) = infer {
        if known == 0 || !numel.is_multiple_of(known) {
            return Err(Error::invalid(
                op,
                format!("cannot view {numel} elements as {shape:?}"),
            ));
        }
        out[i] = numel / known;
    } else if known != numel {
        return Err(Error::invalid(
            op,
            format!("cannot view {numel} elements as {shape:?}"),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_follows_numpy() {
        assert_eq!(
            broadcast_shapes("t", &[3, 1, 5], &[4, 5]).unwrap(),
            vec![3, 4, 5]
        );
        assert!(broadcast_shapes("t", &[3, 2], &[4, 2]).is_err());
        assert_eq!(broadcast_shapes("t", &[], &[2]).unwrap(), vec![2]);
    }

    #[test]
    fn strided_iteration_visits_transposed_order() {
        let l = Layout::contiguous(&[2, 3]).transpose(0, 1).unwrap();
        let mut seen = vec![];
        l.for_each_index(|i| seen.push(i));
        assert_eq!(seen, vec![0, 3, 1, 4, 2, 5]);
        assert!(!l.is_contiguous());
    }

    #[test]
    fn gather_and_scatter_follow_logical_order() {
        let src: Vec<u32> = (0..24).collect();
        for l in [
            Layout::contiguous(&[2, 3, 4]).permute(&[1, 0, 2]).unwrap(),
            Layout::contiguous(&[2, 3, 4]).permute(&[2, 1, 0]).unwrap(),
            Layout::contiguous(&[2, 3, 4]).narrow(2, 1, 2).unwrap(),
            Layout::contiguous(&[4]).broadcast_to(&[3, 4]).unwrap(),
        ] {
            let mut want = vec![];
            l.for_each_index(|i| want.push(src[i]));
            assert_eq!(l.gather(&src), want);
            if l.strides().iter().all(|&s| s != 0) {
                let mut dst = vec![0u32; 24];
                l.scatter(&want, &mut dst);
                l.for_each_index(|i| assert_eq!(dst[i], src[i]));
            }
        }
    }

    #[test]
    fn narrow_and_unsqueeze() {
        let l = Layout::contiguous(&[4, 6]).narrow(1, 2, 3).unwrap();
        assert_eq!((l.shape(), l.offset()), (&[4usize, 3][..], 2));
        assert!(Layout::contiguous(&[4]).narrow(0, 3, 2).is_err());
        let u = Layout::contiguous(&[4, 6]).unsqueeze(-1).unwrap();
        assert_eq!(u.shape(), &[4, 6, 1]);
        assert!(u.is_contiguous());
    }

    #[test]
    fn infer_shape_checks_counts() {
        assert_eq!(infer_shape("v", 12, &[3, -1]).unwrap(), vec![3, 4]);
        assert!(infer_shape("v", 12, &[5, -1]).is_err());
        assert!(infer_shape("v", 12, &[-1, -1]).is_err());
    }
}
