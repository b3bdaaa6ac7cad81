//! Float32 `.npy` reading and (atomic) writing, via npyz.

use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use npyz::WriterBuilder;

#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: expected float32 data, found dtype {dtype}")]
    DType { path: PathBuf, dtype: String },
    #[error("{path}: shape {shape:?} does not match {len} values")]
    Shape {
        path: PathBuf,
        shape: Vec<usize>,
        len: usize,
    },
}

/// Writes `data` (C order) with `shape` to `path`: first to a temporary file beside it, then
/// renamed into place, so a crash never leaves a half-written array under the final name.
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<(), NpyError> {
    let expected: usize = shape.iter().product();
    if expected != data.len() {
        return Err(NpyError::Shape {
            path: path.to_path_buf(),
            shape: shape.to_vec(),
            len: data.len(),
        });
    }
    let io = |cause| NpyError::Io {
        path: path.to_path_buf(),
        cause,
    };
    let mut tmp = crate::files::temp_file_for(path).map_err(io)?;
    {
        let mut buf = BufWriter::new(tmp.as_file_mut());
        let shape_u64: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
        let mut writer = npyz::WriteOptions::new()
            .default_dtype()
            .shape(&shape_u64)
            .writer(&mut buf)
            .begin_nd()
            .map_err(io)?;
        writer.extend(data.iter().copied()).map_err(io)?;
        writer.finish().map_err(io)?;
        buf.flush().map_err(io)?;
    }
    tmp.as_file().sync_all().map_err(io)?;
    crate::files::persist(tmp, path).map_err(io)?;
    Ok(())
}

/// Reads a float32 array: (shape, data in C order).
pub fn read_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>), NpyError> {
    let io = |cause| NpyError::Io {
        path: path.to_path_buf(),
        cause,
    };
    let file = crate::files::open(path).map_err(io)?;
    let npy = npyz::NpyFile::new(BufReader::new(file)).map_err(io)?;
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    if npy.order() != npyz::Order::C {
        return Err(NpyError::DType {
            path: path.to_path_buf(),
            dtype: "Fortran-ordered array".into(),
        });
    }
    let dtype = npy.dtype();
    let descr = dtype.descr();
    if !(descr.contains("<f4") || descr.contains("|f4")) {
        return Err(NpyError::DType {
            path: path.to_path_buf(),
            dtype: descr,
        });
    }
    // The header's shape decides the allocation: it must match the bytes that follow, or a
    // few bytes could claim terabytes.
    let file_len = std::fs::metadata(path).map_err(io)?.len();
    let claimed = shape
        .iter()
        .try_fold(4u64, |acc, &d| acc.checked_mul(d as u64));
    if claimed.is_none_or(|c| c > file_len) {
        return Err(NpyError::Io {
            path: path.to_path_buf(),
            cause: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "the header's shape {shape:?} needs more data than the file's {file_len} bytes"
                ),
            ),
        });
    }
    let data: Vec<f32> = npy.into_vec().map_err(io)?;
    Ok((shape, data))
}
