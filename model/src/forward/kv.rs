//! Per-session key/value caches.
//!
//! On the CPU a layer's keys and values are plain growing `Vec<f32>` buffers, one row of
//! `n_kv_head * head_dim` values per position: appending is a `memcpy`, truncating is
//! `Vec::truncate`, and the attention kernel reads them in place. On other devices they are
//! tensors `[positions, n_kv_head, head_dim]` extended with `Tensor::cat`.
//!
//! A forward never writes a cache while it runs: the new rows of every layer are staged and
//! committed only after the whole batch succeeded, so a failing forward leaves every cache as it
//! was.

use candle_core::{Result, Tensor};

/// One layer's cache for one session.
#[derive(Debug)]
pub(crate) enum LayerKv {
    Host {
        k: Vec<f32>,
        v: Vec<f32>,
        width: usize,
    },
    Device {
        k: Tensor,
        v: Tensor,
    },
}

/// One layer's new keys (rotated) and values for every row of a batch.
#[derive(Debug)]
pub(crate) enum StagedKv {
    Host {
        k: Vec<f32>,
        v: Vec<f32>,
        width: usize,
    },
    Device {
        k: Tensor,
        v: Tensor,
    },
}

impl StagedKv {
    /// Stages `k`, `v: [rows, width]`: as host vectors when `host` (the CPU kernel reads them),
    /// else as tensors on their device.
    pub(crate) fn new(k: Tensor, v: Tensor, host: bool) -> Result<Self> {
        if host {
            let width = k.dim(1)?;
            Ok(StagedKv::Host {
                k: k.flatten_all()?.to_vec1()?,
                v: v.flatten_all()?.to_vec1()?,
                width,
            })
        } else {
            Ok(StagedKv::Device { k, v })
        }
    }

    /// A layer cache holding rows `row0..row0 + len` of this batch.
    fn to_layer(&self, row0: usize, len: usize) -> Result<LayerKv> {
        Ok(match self {
            StagedKv::Host { k, v, width } => LayerKv::Host {
                k: k[row0 * width..(row0 + len) * width].to_vec(),
                v: v[row0 * width..(row0 + len) * width].to_vec(),
                width: *width,
            },
            StagedKv::Device { k, v } => LayerKv::Device {
                k: k.narrow(0, row0, len)?,
                v: v.narrow(0, row0, len)?,
            },
        })
    }
}

impl LayerKv {
    /// The first `len` cached positions as host slices (empty on a device cache).
    pub(crate) fn host_prefix(&self, len: usize) -> (&[f32], &[f32]) {
        match self {
            LayerKv::Host { k, v, width } => (&k[..len * width], &v[..len * width]),
            LayerKv::Device { .. } => (&[], &[]),
        }
    }

    /// The first `len` cached positions as tensors.
    pub(crate) fn device_prefix(&self, len: usize) -> Result<(Tensor, Tensor)> {
        match self {
            LayerKv::Device { k, v } => Ok((k.narrow(0, 0, len)?, v.narrow(0, 0, len)?)),
            LayerKv::Host { k, v, width } => {
                let dev = candle_core::Device::Cpu;
                Ok((
                    Tensor::from_slice(&k[..len * width], (len, *width), &dev)?,
                    Tensor::from_slice(&v[..len * width], (len, *width), &dev)?,
                ))
            }
        }
    }

    fn len(&self) -> Result<usize> {
        match self {
            LayerKv::Host { k, width, .. } => Ok(k.len() / width),
            LayerKv::Device { k, .. } => k.dim(0),
        }
    }

    fn truncate(&mut self, len: usize) -> Result<()> {
        match self {
            LayerKv::Host { k, v, width } => {
                k.truncate(len * *width);
                v.truncate(len * *width);
            }
            LayerKv::Device { k, v } => {
                if k.dim(0)? > len {
                    *k = k.narrow(0, 0, len)?;
                    *v = v.narrow(0, 0, len)?;
                }
            }
        }
        Ok(())
    }

    /// Keeps `start` positions and appends rows `row0..row0 + len` of `staged`.
    fn commit(&mut self, start: usize, staged: &StagedKv, row0: usize, len: usize) -> Result<()> {
        self.truncate(start)?;
        match (self, staged) {
            (
                LayerKv::Host { k, v, .. },
                StagedKv::Host {
                    k: sk,
                    v: sv,
                    width,
                },
            ) => {
                for (dst, src) in [(k, sk), (v, sv)] {
                    reserve_positions(dst, len * width, *width);
                    dst.extend_from_slice(&src[row0 * width..(row0 + len) * width]);
                }
            }
            (LayerKv::Device { k, v }, StagedKv::Device { k: sk, v: sv }) => {
                *k = Tensor::cat(&[&*k, &sk.narrow(0, row0, len)?], 0)?;
                *v = Tensor::cat(&[&*v, &sv.narrow(0, row0, len)?], 0)?;
            }
            _ => candle_core::bail!("kv cache and staged rows live on different devices"),
        }
        Ok(())
    }

    fn bytes(&self) -> usize {
        match self {
            LayerKv::Host { k, v, .. } => (k.capacity() + v.capacity()) * size_of::<f32>(),
            LayerKv::Device { k, v } => {
                (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes()
            }
        }
    }
}

/// Grows `buf` for `extra` more values by a quarter of its size, rounded up to 64 positions:
/// amortised O(1) appends like `Vec`'s doubling, but at most ~25% unused memory per cache (the
/// KV budget counts capacity).
fn reserve_positions(buf: &mut Vec<f32>, extra: usize, width: usize) {
    let need = buf.len() + extra;
    if need <= buf.capacity() {
        return;
    }
    let chunk = 64 * width;
    let target = need
        .max(buf.capacity() + buf.capacity() / 4)
        .div_ceil(chunk)
        * chunk;
    buf.reserve_exact(target - buf.len());
}

/// All layers' caches of one session.
#[derive(Debug)]
pub(crate) struct SessionKv {
    pub layers: Vec<LayerKv>,
}

impl SessionKv {
    /// A new session holding rows `row0..row0 + len` of the staged batch.
    pub(crate) fn from_staged(staged: &[StagedKv], row0: usize, len: usize) -> Result<Self> {
        let layers = staged
            .iter()
            .map(|s| s.to_layer(row0, len))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    /// Keeps `start` positions and appends the staged rows, layer by layer.
    pub(crate) fn commit(
        &mut self,
        start: usize,
        staged: &[StagedKv],
        (row0, len): (usize, usize),
    ) -> Result<()> {
        for (layer, s) in self.layers.iter_mut().zip(staged) {
            layer.commit(start, s, row0, len)?;
        }
        Ok(())
    }

    pub(crate) fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len().unwrap_or(0))
    }

    pub(crate) fn truncate(&mut self, len: usize) -> Result<()> {
        for layer in &mut self.layers {
            layer.truncate(len)?;
        }
        Ok(())
    }

    pub(crate) fn bytes(&self) -> usize {
        self.layers.iter().map(LayerKv::bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::reserve_positions;

    #[test]
    fn growth_is_amortised_and_bounded() {
        let width = 8;
        let mut buf = Vec::new();
        let mut reallocs = 0;
        for _ in 0..5000 {
            let cap = buf.capacity();
            reserve_positions(&mut buf, width, width);
            buf.extend_from_slice(&[0f32; 8]);
            reallocs += usize::from(buf.capacity() != cap);
            let slack = buf.capacity() - buf.len();
            assert!(
                slack <= buf.len() / 4 + 64 * width,
                "{slack} for {}",
                buf.len()
            );
        }
        assert!(reallocs < 40, "{reallocs} reallocations");
    }
}
