//! Reading and writing safetensors files: every floating tensor is widened to f32 on load
//! (F32, BF16 and F16 accepted), integer tensors (cu_seqlens) read as i64.

use nsa::{NsaError, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::Path;

/// One loaded tensor: shape, f32 data and the dtype it had in the file (F32, BF16 or F16;
/// 16-bit values widen to f32 exactly).
#[derive(Debug, Clone)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
    pub dtype: Dtype,
}

/// All tensors of a file by name.
#[derive(Debug, Default)]
pub struct TensorFile {
    pub floats: BTreeMap<String, Tensor>,
    pub ints: BTreeMap<String, (Vec<usize>, Vec<i64>)>,
}

fn fmt_err(path: &Path, e: impl std::fmt::Display) -> NsaError {
    NsaError::Format(format!("{}: {e}", path.display()))
}

impl TensorFile {
    /// Loads a safetensors file.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .map_err(|e| NsaError::Io(format!("cannot read {}: {e}", path.display())))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| fmt_err(path, e))?;
        let mut out = TensorFile::default();
        for (name, view) in st.tensors() {
            let shape = view.shape().to_vec();
            let raw = view.data();
            let floats: Option<Vec<f32>> = match view.dtype() {
                Dtype::F32 => Some(
                    raw.chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                ),
                Dtype::BF16 => Some(
                    raw.chunks_exact(2)
                        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                        .collect(),
                ),
                Dtype::F16 => Some(
                    raw.chunks_exact(2)
                        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                        .collect(),
                ),
                _ => None,
            };
            if let Some(data) = floats {
                let dtype = view.dtype();
                out.floats.insert(name, Tensor { shape, data, dtype });
                continue;
            }
            let ints: Vec<i64> = match view.dtype() {
                Dtype::I32 => raw
                    .chunks_exact(4)
                    .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)
                    .collect(),
                Dtype::I64 => raw
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().expect("8-byte chunk")))
                    .collect(),
                other => {
                    return Err(NsaError::UnsupportedDtype {
                        name,
                        dtype: format!("{other:?}"),
                    })
                }
            };
            out.ints.insert(name, (shape, ints));
        }
        Ok(out)
    }

    /// A float tensor that must be present.
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.floats.get(name).ok_or_else(|| {
            if self.ints.contains_key(name) {
                NsaError::UnsupportedDtype {
                    name: name.to_string(),
                    dtype: "integer (a float type is needed)".into(),
                }
            } else {
                NsaError::MissingTensor(name.to_string())
            }
        })
    }

    /// A float tensor that must be present with exactly this shape.
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<&Tensor> {
        let t = self.get(name)?;
        if t.shape != shape {
            return Err(NsaError::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                got: t.shape.clone(),
            });
        }
        Ok(t)
    }
}

/// Tensors to write: f32 or i32 payloads with shapes.
#[derive(Default)]
pub struct OutFile {
    entries: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
}

impl OutFile {
    pub fn f32(&mut self, name: &str, shape: Vec<usize>, data: &[f32]) {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.entries
            .push((name.to_string(), Dtype::F32, shape, bytes));
    }

    pub fn i32(&mut self, name: &str, shape: Vec<usize>, data: &[i32]) {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.entries
            .push((name.to_string(), Dtype::I32, shape, bytes));
    }

    /// Writes the file (safetensors format).
    pub fn save(&self, path: &Path) -> Result<()> {
        let views = self
            .entries
            .iter()
            .map(|(n, dt, shape, bytes)| {
                safetensors::tensor::TensorView::new(*dt, shape.clone(), bytes)
                    .map(|v| (n.clone(), v))
                    .map_err(|e| fmt_err(path, e))
            })
            .collect::<Result<Vec<_>>>()?;
        let buf = safetensors::serialize(views, None).map_err(|e| fmt_err(path, e))?;
        std::fs::write(path, buf)
            .map_err(|e| NsaError::Io(format!("cannot write {}: {e}", path.display())))
    }
}
