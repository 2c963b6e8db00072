//! TEMPORARY placeholder with the agreed API (replaced by the gemm branch on merge).
use super::Isa;
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}
pub struct MatMut<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
}
pub fn sgemm(alpha: f32, a: MatRef, b: MatRef, beta: f32, c: MatMut) -> crate::Result<()> {
    sgemm_with(Isa::Scalar, alpha, a, b, beta, c)
}
pub fn sgemm_with(
    _isa: Isa,
    alpha: f32,
    a: MatRef,
    b: MatRef,
    beta: f32,
    c: MatMut,
) -> crate::Result<()> {
    for i in 0..a.rows {
        for j in 0..b.cols {
            let mut s = 0.0;
            for p in 0..a.cols {
                s += a.data[i * a.row_stride + p * a.col_stride]
                    * b.data[p * b.row_stride + j * b.col_stride];
            }
            let o = &mut c.data[i * c.row_stride + j];
            *o = if beta == 0.0 {
                alpha * s
            } else {
                alpha * s + beta * *o
            };
        }
    }
    Ok(())
}
