//! Shapes and byte layout of a KV-cache block file, and the copy plans that
//! move one file block between the paged GPU cache and a contiguous buffer.
//!
//! Pure arithmetic: nothing here touches CUDA, so all of it is unit-tested on
//! machines without a GPU. `docs/kv-layout.md` states the same layout for
//! readers in other languages; the two must change together.
//!
//! GPU side (vLLM's paged layout): one tensor per layer, shaped
//! `[2 (K, V), num_gpu_blocks, gpu_block_tokens, kv_heads, head_dim]`, row
//! major. File side: one file holds `file_block_tokens` tokens of every layer,
//! as `[layers, 2 (K, V), gpu_blocks_per_file, gpu_block_tokens, kv_heads,
//! head_dim]`, row major, no header and no padding. The unit both sides share
//! is a *chunk*: one (layer, K or V, GPU block), `gpu_block_tokens * kv_heads
//! * head_dim` elements, contiguous on both sides.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// Element type of the cache. Only the size matters here: blocks are moved
/// as bytes and never interpreted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    Bf16,
    Fp16,
    Fp8,
}

impl Dtype {
    pub fn bytes(self) -> u64 {
        match self {
            Dtype::Bf16 | Dtype::Fp16 => 2,
            Dtype::Fp8 => 1,
        }
    }
}

impl FromStr for Dtype {
    type Err = LayoutError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" => Ok(Dtype::Bf16),
            "fp16" | "float16" | "half" => Ok(Dtype::Fp16),
            "fp8" | "float8" | "fp8_e4m3" | "fp8_e5m2" => Ok(Dtype::Fp8),
            _ => Err(LayoutError::Dtype(s.to_string())),
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dtype::Bf16 => "bf16",
            Dtype::Fp16 => "fp16",
            Dtype::Fp8 => "fp8",
        })
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("unknown dtype {0:?} (bf16, fp16 or fp8)")]
    Dtype(String),
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error(
        "file_block_tokens ({file}) must be a multiple of gpu_block_tokens ({gpu}): a file holds whole GPU blocks"
    )]
    NotMultiple { file: u64, gpu: u64 },
    #[error("the shape's sizes overflow 64 bits")]
    Overflow,
    #[error("a file block needs {expected} GPU block ids, got {got}")]
    BlockIds { expected: u64, got: usize },
    #[error("GPU block id {id} is out of range (the cache has {num} blocks)")]
    BlockId { id: u64, num: u64 },
    #[error("{layers} layers need {layers} layer base addresses, got {got}")]
    LayerBases { layers: u64, got: usize },
    #[error(
        "3d copies need every layer in one allocation at a stride that is a multiple of the K/V stride"
    )]
    NotUniform,
}

/// The model-side shape of the cache and of one file block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KvShape {
    pub layers: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub dtype: Dtype,
    pub gpu_block_tokens: u64,
    pub file_block_tokens: u64,
}

impl KvShape {
    pub fn new(
        layers: u64,
        kv_heads: u64,
        head_dim: u64,
        dtype: Dtype,
        gpu_block_tokens: u64,
        file_block_tokens: u64,
    ) -> Result<Self, LayoutError> {
        for (v, name) in [
            (layers, "layers"),
            (kv_heads, "kv_heads"),
            (head_dim, "head_dim"),
            (gpu_block_tokens, "gpu_block_tokens"),
            (file_block_tokens, "file_block_tokens"),
        ] {
            if v == 0 {
                return Err(LayoutError::Zero(name));
            }
        }
        if !file_block_tokens.is_multiple_of(gpu_block_tokens) {
            return Err(LayoutError::NotMultiple {
                file: file_block_tokens,
                gpu: gpu_block_tokens,
            });
        }
        let shape = KvShape {
            layers,
            kv_heads,
            head_dim,
            dtype,
            gpu_block_tokens,
            file_block_tokens,
        };
        // Checked once here so that the plain arithmetic below cannot overflow.
        shape
            .chunk_bytes_checked()
            .and_then(|c| c.checked_mul(shape.layers))
            .and_then(|c| c.checked_mul(2))
            .and_then(|c| c.checked_mul(shape.gpu_blocks_per_file()))
            .ok_or(LayoutError::Overflow)?;
        Ok(shape)
    }

    fn chunk_bytes_checked(&self) -> Option<u64> {
        self.gpu_block_tokens
            .checked_mul(self.kv_heads)?
            .checked_mul(self.head_dim)?
            .checked_mul(self.dtype.bytes())
    }

    /// Bytes of one (layer, K or V, GPU block): the unit contiguous on both
    /// the GPU and in the file.
    pub fn chunk_bytes(&self) -> u64 {
        self.gpu_block_tokens * self.kv_heads * self.head_dim * self.dtype.bytes()
    }

    pub fn gpu_blocks_per_file(&self) -> u64 {
        self.file_block_tokens / self.gpu_block_tokens
    }

    /// Size of one file block.
    pub fn file_bytes(&self) -> u64 {
        self.layers * 2 * self.gpu_blocks_per_file() * self.chunk_bytes()
    }

    /// Offset in a file of the chunk of `layer`, `kv` (0 = K, 1 = V) and the
    /// file's `j`-th GPU block (tokens `j * gpu_block_tokens ..`).
    pub fn file_offset(&self, layer: u64, kv: u64, j: u64) -> u64 {
        ((layer * 2 + kv) * self.gpu_blocks_per_file() + j) * self.chunk_bytes()
    }

    /// Distance in a file between the K and the V chunks of one layer.
    pub fn file_kv_stride(&self) -> u64 {
        self.gpu_blocks_per_file() * self.chunk_bytes()
    }

    /// Distance in a file between two layers.
    pub fn file_layer_stride(&self) -> u64 {
        2 * self.file_kv_stride()
    }
}

/// The GPU cache: the shape plus how many GPU blocks each layer holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheGeometry {
    pub shape: KvShape,
    pub num_gpu_blocks: u64,
}

impl CacheGeometry {
    pub fn new(shape: KvShape, num_gpu_blocks: u64) -> Result<Self, LayoutError> {
        if num_gpu_blocks == 0 {
            return Err(LayoutError::Zero("num_gpu_blocks"));
        }
        shape
            .chunk_bytes()
            .checked_mul(num_gpu_blocks)
            .and_then(|b| b.checked_mul(2 * shape.layers))
            .ok_or(LayoutError::Overflow)?;
        Ok(CacheGeometry {
            shape,
            num_gpu_blocks,
        })
    }

    /// Distance on the GPU between a layer's K and V halves.
    pub fn kv_stride(&self) -> u64 {
        self.num_gpu_blocks * self.shape.chunk_bytes()
    }

    /// Bytes of one layer's tensor.
    pub fn layer_bytes(&self) -> u64 {
        2 * self.kv_stride()
    }

    /// Offset of a chunk inside its layer's tensor.
    pub fn device_offset(&self, kv: u64, gpu_block: u64) -> u64 {
        kv * self.kv_stride() + gpu_block * self.shape.chunk_bytes()
    }
}

/// How one file block is cut into DMA operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CopyMode {
    /// One 1D copy per chunk (layers x 2 x blocks-per-file copies).
    Chunk,
    /// One 1D copy per run of consecutive GPU block ids, per layer and K/V.
    Run,
    /// One 2D copy per run and layer, K and V as its two rows.
    #[serde(rename = "2d")]
    TwoD,
    /// One 3D copy per run covering every layer; needs the layers in one
    /// allocation at a uniform stride.
    #[serde(rename = "3d")]
    ThreeD,
}

impl FromStr for CopyMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "chunk" => Ok(CopyMode::Chunk),
            "run" => Ok(CopyMode::Run),
            "2d" => Ok(CopyMode::TwoD),
            "3d" => Ok(CopyMode::ThreeD),
            _ => Err(format!("copy mode must be chunk, run, 2d or 3d, not {s:?}")),
        }
    }
}

impl fmt::Display for CopyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CopyMode::Chunk => "chunk",
            CopyMode::Run => "run",
            CopyMode::TwoD => "2d",
            CopyMode::ThreeD => "3d",
        })
    }
}

/// One DMA operation between GPU memory and a file-block buffer. Linear
/// copies have `height == depth == 1`. Rows are `width` bytes; the GPU side
/// advances `dev_pitch` per row and `dev_pitch * dev_rows` per slice, the
/// buffer side `buf_pitch` and `buf_pitch * buf_rows`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dma {
    /// Absolute device address of the first byte.
    pub dev: u64,
    /// Offset in the file-block buffer of the first byte.
    pub buf_off: u64,
    pub width: u64,
    pub height: u64,
    pub depth: u64,
    pub dev_pitch: u64,
    pub dev_rows: u64,
    pub buf_pitch: u64,
    pub buf_rows: u64,
}

impl Dma {
    fn linear(dev: u64, buf_off: u64, bytes: u64) -> Self {
        Dma {
            dev,
            buf_off,
            width: bytes,
            height: 1,
            depth: 1,
            dev_pitch: bytes,
            dev_rows: 1,
            buf_pitch: bytes,
            buf_rows: 1,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.width * self.height * self.depth
    }

    /// Every (device address, buffer offset, length) row this copy moves:
    /// what tests compare across modes.
    pub fn rows(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        (0..self.depth).flat_map(move |z| {
            (0..self.height).map(move |y| {
                (
                    self.dev + z * self.dev_pitch * self.dev_rows + y * self.dev_pitch,
                    self.buf_off + z * self.buf_pitch * self.buf_rows + y * self.buf_pitch,
                    self.width,
                )
            })
        })
    }
}

/// A run of consecutive GPU block ids: file blocks `j0 .. j0 + len` live in
/// GPU blocks `b0 .. b0 + len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub j0: u64,
    pub b0: u64,
    pub len: u64,
}

/// Groups consecutive ids so that each run is one contiguous stretch on the
/// GPU and in the file.
pub fn runs(ids: &[u64]) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for (j, &b) in ids.iter().enumerate() {
        let j = j as u64;
        match out.last_mut() {
            Some(r) if r.b0 + r.len == b => r.len += 1,
            _ => out.push(Run {
                j0: j,
                b0: b,
                len: 1,
            }),
        }
    }
    out
}

/// The copies that move one file block whose `j`-th GPU block is `ids[j]`.
/// `layer_bases` holds each layer tensor's device address. The same plan
/// serves both directions.
pub fn plan(
    geom: &CacheGeometry,
    layer_bases: &[u64],
    ids: &[u64],
    mode: CopyMode,
) -> Result<Vec<Dma>, LayoutError> {
    let shape = &geom.shape;
    let bpf = shape.gpu_blocks_per_file();
    if ids.len() as u64 != bpf {
        return Err(LayoutError::BlockIds {
            expected: bpf,
            got: ids.len(),
        });
    }
    if layer_bases.len() as u64 != shape.layers {
        return Err(LayoutError::LayerBases {
            layers: shape.layers,
            got: layer_bases.len(),
        });
    }
    if let Some(&id) = ids.iter().find(|&&id| id >= geom.num_gpu_blocks) {
        return Err(LayoutError::BlockId {
            id,
            num: geom.num_gpu_blocks,
        });
    }
    let chunk = shape.chunk_bytes();
    let mut out = Vec::new();
    match mode {
        CopyMode::Chunk => {
            for (l, &base) in layer_bases.iter().enumerate() {
                for kv in 0..2 {
                    for (j, &b) in ids.iter().enumerate() {
                        out.push(Dma::linear(
                            base + geom.device_offset(kv, b),
                            shape.file_offset(l as u64, kv, j as u64),
                            chunk,
                        ));
                    }
                }
            }
        }
        CopyMode::Run => {
            let runs = runs(ids);
            for (l, &base) in layer_bases.iter().enumerate() {
                for kv in 0..2 {
                    for r in &runs {
                        out.push(Dma::linear(
                            base + geom.device_offset(kv, r.b0),
                            shape.file_offset(l as u64, kv, r.j0),
                            r.len * chunk,
                        ));
                    }
                }
            }
        }
        CopyMode::TwoD => {
            for r in runs(ids) {
                for (l, &base) in layer_bases.iter().enumerate() {
                    out.push(Dma {
                        dev: base + geom.device_offset(0, r.b0),
                        buf_off: shape.file_offset(l as u64, 0, r.j0),
                        width: r.len * chunk,
                        height: 2,
                        depth: 1,
                        dev_pitch: geom.kv_stride(),
                        dev_rows: 2,
                        buf_pitch: shape.file_kv_stride(),
                        buf_rows: 2,
                    });
                }
            }
        }
        CopyMode::ThreeD => {
            let stride = uniform_stride(layer_bases).ok_or(LayoutError::NotUniform)?;
            if layer_bases.len() > 1
                && (!stride.is_multiple_of(geom.kv_stride()) || stride < geom.layer_bytes())
            {
                return Err(LayoutError::NotUniform);
            }
            let dev_rows = if layer_bases.len() > 1 {
                stride / geom.kv_stride()
            } else {
                2
            };
            for r in runs(ids) {
                out.push(Dma {
                    dev: layer_bases[0] + geom.device_offset(0, r.b0),
                    buf_off: shape.file_offset(0, 0, r.j0),
                    width: r.len * chunk,
                    height: 2,
                    depth: shape.layers,
                    dev_pitch: geom.kv_stride(),
                    dev_rows,
                    buf_pitch: shape.file_kv_stride(),
                    buf_rows: 2,
                });
            }
        }
    }
    Ok(out)
}

/// The common distance between consecutive layer bases, if there is one.
fn uniform_stride(bases: &[u64]) -> Option<u64> {
    let &first = bases.first()?;
    let Some(&second) = bases.get(1) else {
        return Some(0);
    };
    let stride = second.checked_sub(first)?;
    bases
        .windows(2)
        .all(|w| w[1].checked_sub(w[0]) == Some(stride))
        .then_some(stride)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama() -> KvShape {
        KvShape::new(32, 8, 128, Dtype::Bf16, 16, 256).expect("shape")
    }

    #[test]
    fn llama_sizes() {
        let s = llama();
        assert_eq!(s.chunk_bytes(), 16 * 8 * 128 * 2);
        assert_eq!(s.gpu_blocks_per_file(), 16);
        assert_eq!(s.file_bytes(), 32 << 20);
        assert_eq!(s.file_kv_stride(), 16 * 32 * 1024);
        assert_eq!(s.file_layer_stride(), 1 << 20);
        let fp8 = KvShape::new(32, 8, 128, Dtype::Fp8, 16, 256).expect("shape");
        assert_eq!(fp8.file_bytes(), 16 << 20);
    }

    #[test]
    fn file_offsets_tile_the_file_exactly_once() {
        let s = KvShape::new(3, 2, 4, Dtype::Fp16, 2, 6).expect("shape");
        let mut offs = Vec::new();
        for l in 0..3 {
            for kv in 0..2 {
                for j in 0..3 {
                    offs.push(s.file_offset(l, kv, j));
                }
            }
        }
        // Ordered by (layer, kv, j) and each chunk right after the last.
        let expected: Vec<u64> = (0..offs.len() as u64)
            .map(|i| i * s.chunk_bytes())
            .collect();
        assert_eq!(offs, expected);
        assert_eq!(
            s.file_offset(2, 1, 2) + s.chunk_bytes(),
            s.file_bytes(),
            "the last chunk ends the file"
        );
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert_eq!(
            KvShape::new(32, 8, 128, Dtype::Bf16, 16, 250),
            Err(LayoutError::NotMultiple { file: 250, gpu: 16 })
        );
        assert_eq!(
            KvShape::new(0, 8, 128, Dtype::Bf16, 16, 256),
            Err(LayoutError::Zero("layers"))
        );
        assert_eq!(
            KvShape::new(32, 8, 128, Dtype::Bf16, 0, 256),
            Err(LayoutError::Zero("gpu_block_tokens"))
        );
        assert_eq!(
            KvShape::new(u64::MAX / 2, 8, 128, Dtype::Bf16, 16, 256),
            Err(LayoutError::Overflow)
        );
        assert!(matches!(
            "int4".parse::<Dtype>(),
            Err(LayoutError::Dtype(d)) if d == "int4"
        ));
        let geom = CacheGeometry::new(llama(), 64).expect("geom");
        let bases: Vec<u64> = (0..32).map(|l| l * geom.layer_bytes()).collect();
        assert_eq!(
            plan(&geom, &bases, &[0; 15], CopyMode::Run),
            Err(LayoutError::BlockIds {
                expected: 16,
                got: 15
            })
        );
        let mut ids: Vec<u64> = (0..16).collect();
        ids[3] = 64;
        assert_eq!(
            plan(&geom, &bases, &ids, CopyMode::Chunk),
            Err(LayoutError::BlockId { id: 64, num: 64 })
        );
        assert_eq!(
            plan(&geom, &bases[..31], &[0; 16], CopyMode::Chunk),
            Err(LayoutError::LayerBases {
                layers: 32,
                got: 31
            })
        );
        let mut uneven = bases.clone();
        uneven[5] += 4096;
        assert_eq!(
            plan(&geom, &uneven, &[0; 16], CopyMode::ThreeD),
            Err(LayoutError::NotUniform)
        );
    }

    #[test]
    fn runs_group_consecutive_ids() {
        assert_eq!(
            runs(&[4, 5, 6, 9, 10, 2]),
            vec![
                Run {
                    j0: 0,
                    b0: 4,
                    len: 3
                },
                Run {
                    j0: 3,
                    b0: 9,
                    len: 2
                },
                Run {
                    j0: 5,
                    b0: 2,
                    len: 1
                },
            ]
        );
        assert!(runs(&[]).is_empty());
    }

    /// Every mode must move exactly the same bytes: expand each plan into
    /// chunk-sized pieces and compare with the chunk plan, which is the
    /// layout's definition.
    fn pieces(plan: &[Dma], chunk: u64) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = plan
            .iter()
            .flat_map(|c| c.rows())
            .flat_map(|(d, b, len)| {
                assert_eq!(len % chunk, 0);
                (0..len / chunk).map(move |i| (d + i * chunk, b + i * chunk))
            })
            .collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn all_modes_move_the_same_chunks() {
        let shape = KvShape::new(4, 2, 8, Dtype::Bf16, 4, 16).expect("shape");
        let geom = CacheGeometry::new(shape, 20).expect("geom");
        let base = 1 << 30;
        let bases: Vec<u64> = (0..4).map(|l| base + l * geom.layer_bytes()).collect();
        let chunk = shape.chunk_bytes();
        for ids in [vec![0, 1, 2, 3], vec![7, 8, 3, 19], vec![19, 18, 17, 16]] {
            let reference = plan(&geom, &bases, &ids, CopyMode::Chunk).expect("chunk");
            assert_eq!(reference.len(), 4 * 2 * 4);
            let want = pieces(&reference, chunk);
            // The chunk plan is the layout itself: check it against the formulas.
            for (l, kv, j) in
                (0..4).flat_map(|l| (0..2).flat_map(move |kv| (0..4).map(move |j| (l, kv, j))))
            {
                let dev = bases[l as usize] + kv * geom.kv_stride() + ids[j as usize] * chunk;
                assert!(want.contains(&(dev, shape.file_offset(l, kv, j))));
            }
            for mode in [CopyMode::Run, CopyMode::TwoD, CopyMode::ThreeD] {
                let p = plan(&geom, &bases, &ids, mode).expect("plan");
                assert_eq!(pieces(&p, chunk), want, "{mode} with ids {ids:?}");
                let total: u64 = p.iter().map(Dma::bytes).sum();
                assert_eq!(total, shape.file_bytes());
            }
        }
    }

    #[test]
    fn contiguous_ids_need_one_3d_copy() {
        let geom = CacheGeometry::new(llama(), 128).expect("geom");
        let bases: Vec<u64> = (0..32).map(|l| l * geom.layer_bytes()).collect();
        let ids: Vec<u64> = (16..32).collect();
        assert_eq!(
            plan(&geom, &bases, &ids, CopyMode::ThreeD)
                .expect("3d")
                .len(),
            1
        );
        assert_eq!(
            plan(&geom, &bases, &ids, CopyMode::TwoD).expect("2d").len(),
            32
        );
        assert_eq!(
            plan(&geom, &bases, &ids, CopyMode::Run).expect("run").len(),
            64
        );
        assert_eq!(
            plan(&geom, &bases, &ids, CopyMode::Chunk)
                .expect("chunk")
                .len(),
            1024
        );
    }

    #[test]
    fn three_d_accepts_padded_layer_stride() {
        let shape = KvShape::new(3, 1, 4, Dtype::Fp8, 2, 4).expect("shape");
        let geom = CacheGeometry::new(shape, 5).expect("geom");
        // Layers 3 K/V strides apart instead of 2: still one 3D copy.
        let bases: Vec<u64> = (0..3).map(|l| l * 3 * geom.kv_stride()).collect();
        let p = plan(&geom, &bases, &[1, 2], CopyMode::ThreeD).expect("3d");
        let reference = plan(&geom, &bases, &[1, 2], CopyMode::Chunk).expect("chunk");
        assert_eq!(
            pieces(&p, shape.chunk_bytes()),
            pieces(&reference, shape.chunk_bytes())
        );
    }
}
