"""4-bit weights (bitsandbytes NF4/FP4) on tensor cores for 1-16 rows: a CUDA kernel over a pre-shuffled layout.

The Triton GEMV decodes nibbles with byte permutes and multiplies in fp32: about 7 instructions a
weight, which bounds it at a third of the H200's copy bandwidth. This kernel does less per weight:
- **Lookups, not permutes.** A byte holds two 4-bit codes, so one 256-entry table of 16-bit pairs
  turns it into the two weights as a packed bf16x2 (or f16x2) register, in one shared-memory load.
  The table is kept 32 times, entry e of lane l at word 32·e + l, so the 32 lanes of a warp never
  meet in a bank (FLUTE's duplicated table).
- **Tensor cores do the multiply.** The pairs are exactly the A operand of `mma.sync` m16n8k16
  (a pair of adjacent K elements of one row per register), so no product or conversion is done on
  the CUDA cores; the absmax scales each 64-wide block's fp32 partial sums once. The MMA's 8 columns
  are up to 8 activation rows (two MMAs for 9-16): 1-16 rows cost about what one row costs.
- **A layout made for it** (Marlin's idea): at fast-path time the stored bytes are permuted in place
  so that each lane's 16-byte load holds its four A registers for four MMAs (one absmax block), and
  a warp's 512-byte load is one 16-row x 64-column tile. K is permuted too, identically for weights
  and activations (a sum does not care about order): lane t takes the 16 consecutive activations
  kg·64 + 16t ... + 15 of each block, two 16-byte loads. The permutation is a reshape and a transpose
  of the byte array: no memory is added, `unshuffle_` restores the stored bytes exactly, and a save
  (which reverses the fast path first) writes bitsandbytes' own layout.

While shuffled, bitsandbytes' own forward would read the wrong bytes, so a shuffled layer computes
more than 16 rows (prefill) by unshuffling a temporary copy and dequantizing it with bitsandbytes, as
its own forward dequantizes before cuBLAS.

Needs: a CUDA GPU with tensor cores for bf16 (sm_80+), NVRTC (core.kernels.nvrtc), 16-bit
activations, blocks of 64, N a multiple of 16, K of 64. `emulate` is the kernel's register-level
algorithm in PyTorch (CPU tests check the layout and the fragment mapping with it); the Triton
kernels (core.kernels.w4a16) stay the fallback.
"""

from __future__ import annotations

import torch

from core.kernels import nvrtc
from core.kernels.tiling import outputs, rows_of
from core.kernels.w4a16 import Packed

BLOCKSIZE = 64
TILE_ROWS = 16
MAX_ROWS = 16
WARPS = 8
UNROLL = 2

SOURCE = r"""
#define WARPS %(warps)d
#define COLS %(cols)d
#define NESTED %(nested)d
#define SILU %(silu)d
#define F16 %(f16)d
#define UNROLL %(unroll)d
#define MEMBERS (SILU + 1)
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
#if NESTED
typedef u32 raw_t;  // an absmax code, decoded when used so that its second load never stalls the loads
#else
typedef float raw_t;
#endif

struct Member { const uint4* w; const void* am; const float* s; const float* f; };

__device__ __forceinline__ u16 to16(float f) {
  u16 r;
#if F16
  asm("cvt.rn.f16.f32 %%0, %%1;" : "=h"(r) : "f"(f));
#else
  asm("cvt.rn.bf16.f32 %%0, %%1;" : "=h"(r) : "f"(f));
#endif
  return r;
}

__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%%0, %%1, %%2, %%3}, [%%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ uint4 load_cached(const uint4* p) {
  uint4 v;
  asm("ld.global.nc.v4.u32 {%%0, %%1, %%2, %%3}, [%%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if F16
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%%0, %%1, %%2, %%3}, {%%4, %%5, %%6, %%7}, {%%8, %%9}, "
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%%0, %%1, %%2, %%3}, {%%4, %%5, %%6, %%7}, {%%8, %%9}, "
#endif
      "{%%0, %%1, %%2, %%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The weights and absmax of this warp's K blocks number UNROLL·round ... (blocks warp, warp + WARPS, ...).
__device__ __forceinline__ void load_round(uint4 (&w)[UNROLL][MEMBERS], raw_t (&sc)[UNROLL][MEMBERS][2],
                                           const Member (&mem)[MEMBERS], int round, int warp, int lane, int g,
                                           long tile, int KG) {
#pragma unroll
  for (int u = 0; u < UNROLL; u++) {
    const int kg = warp + (round * UNROLL + u) * WARPS;
    if (kg < KG) {
      const long block = tile * KG + kg;
#pragma unroll
      for (int p = 0; p < MEMBERS; p++) {
        w[u][p] = load_stream(mem[p].w + block * 32 + lane);
#if NESTED
        sc[u][p][0] = ((const u8*)mem[p].am)[block * 16 + g];
        sc[u][p][1] = ((const u8*)mem[p].am)[block * 16 + g + 8];
#else
        sc[u][p][0] = ((const float*)mem[p].am)[block * 16 + g];
        sc[u][p][1] = ((const float*)mem[p].am)[block * 16 + g + 8];
#endif
      }
    }
  }
}

__device__ __forceinline__ float absmax(raw_t raw, const Member& m, const float* code2, long row, int kg, int KG) {
#if NESTED
  return code2[raw] * m.s[(row * KG + kg) >> 8] + *m.f;  // absmax2 by the stored (unshuffled) block number
#else
  return raw;
#endif
}

__device__ __forceinline__ void compute_round(float (&acc)[MEMBERS][COLS][4], const uint4 (&w)[UNROLL][MEMBERS],
                                              const raw_t (&sc)[UNROLL][MEMBERS][2], const Member (&mem)[MEMBERS],
                                              const float* code2, const u16* x, const int (&xr)[COLS], int xs,
                                              const u32* L, int round, int warp, int t, long r0, int KG) {
#pragma unroll
  for (int u = 0; u < UNROLL; u++) {
    const int kg = warp + (round * UNROLL + u) * WARPS;
    if (kg < KG) {
      uint4 xv[COLS][2];
#pragma unroll
      for (int c = 0; c < COLS; c++) {
        const uint4* xp = (const uint4*)(x + (long)xr[c] * xs + kg * 64 + t * 16);
        xv[c][0] = load_cached(xp);
        xv[c][1] = load_cached(xp + 1);
      }
#pragma unroll
      for (int p = 0; p < MEMBERS; p++) {
        float part[2][COLS][4];  // two chains of MMAs (even and odd K steps) in flight at once
#pragma unroll
        for (int h = 0; h < 2; h++)
#pragma unroll
          for (int c = 0; c < COLS; c++)
#pragma unroll
            for (int v = 0; v < 4; v++) part[h][c][v] = 0.f;
        const u32 words[4] = {w[u][p].x, w[u][p].y, w[u][p].z, w[u][p].w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
          const u32 q = words[j];
          const u32 A0 = L[(q & 0xFF) << 5], A1 = L[((q >> 8) & 0xFF) << 5];
          const u32 A2 = L[((q >> 16) & 0xFF) << 5], A3 = L[(q >> 24) << 5];
#pragma unroll
          for (int c = 0; c < COLS; c++) {
            const uint4 xa = xv[c][j >> 1];
            mma(part[j & 1][c], A0, A1, A2, A3, (j & 1) ? xa.z : xa.x, (j & 1) ? xa.w : xa.y);
          }
        }
        const float s0 = absmax(sc[u][p][0], mem[p], code2, r0, kg, KG);
        const float s1 = absmax(sc[u][p][1], mem[p], code2, r0 + 8, kg, KG);
#pragma unroll
        for (int c = 0; c < COLS; c++) {
          acc[p][c][0] += (part[0][c][0] + part[1][c][0]) * s0;
          acc[p][c][1] += (part[0][c][1] + part[1][c][1]) * s0;
          acc[p][c][2] += (part[0][c][2] + part[1][c][2]) * s1;
          acc[p][c][3] += (part[0][c][3] + part[1][c][3]) * s1;
        }
      }
    }
  }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32) w4mma(
    const u16* __restrict__ x, const float* __restrict__ code, const float* __restrict__ code2,
    const uint4* w0, const void* a0, const float* s0, const float* f0, u16* o0, int n0,
    const uint4* w1, const void* a1, const float* s1, const float* f1, u16* o1, int n1,
    const uint4* w2, const void* a2, const float* s2, const float* f2, u16* o2, int n2,
    int M, int K, int xs) {
  __shared__ u32 lut[256 * 32];  // entry e of lane l at 32e + l; reused for the warps' partial sums at the end
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int tile = blockIdx.x;
  Member mem[MEMBERS];
  mem[0] = Member{w0, a0, s0, f0};
  u16* out = o0;
  int n = n0;
#if SILU
  mem[1] = Member{w1, a1, s1, f1};
#else
  if (tile >= n0 / 16) {
    tile -= n0 / 16;
    if (tile < n1 / 16) { mem[0] = Member{w1, a1, s1, f1}; out = o1; n = n1; }
    else { tile -= n1 / 16; mem[0] = Member{w2, a2, s2, f2}; out = o2; n = n2; }
  }
#endif
  const int g = lane >> 2, t = lane & 3, KG = K >> 6;
  const long r0 = (long)tile * 16 + g;
  const int mine = (KG - warp + WARPS - 1) / WARPS, rounds = (mine + UNROLL - 1) / UNROLL;
  uint4 wa[UNROLL][MEMBERS], wb[UNROLL][MEMBERS];
  raw_t sa[UNROLL][MEMBERS][2], sb[UNROLL][MEMBERS][2];
  if (rounds > 0) load_round(wa, sa, mem, 0, warp, lane, g, tile, KG);  // in flight while the table is built
  for (int e = threadIdx.x; e < 256; e += WARPS * 32) {
    // byte e holds element 2i in its high nibble: the low half of the pair (the lower K position)
    const u32 pair = (u32)to16(code[e >> 4]) | ((u32)to16(code[e & 15]) << 16);
#pragma unroll 8
    for (int i = 0; i < 32; i++) lut[e * 32 + ((i + lane) & 31)] = pair;  // lanes write different banks
  }
  __syncthreads();
  int xr[COLS];
#pragma unroll
  for (int c = 0; c < COLS; c++) xr[c] = min(c * 8 + g, M - 1);
  const u32* L = lut + lane;
  float acc[MEMBERS][COLS][4];
#pragma unroll
  for (int p = 0; p < MEMBERS; p++)
#pragma unroll
    for (int c = 0; c < COLS; c++)
#pragma unroll
      for (int v = 0; v < 4; v++) acc[p][c][v] = 0.f;
  for (int r = 0; r < rounds; r += 2) {  // two register buffers: the next round loads while this one computes
    if (r + 1 < rounds) load_round(wb, sb, mem, r + 1, warp, lane, g, tile, KG);
    compute_round(acc, wa, sa, mem, code2, x, xr, xs, L, r, warp, t, r0, KG);
    if (r + 1 < rounds) {
      if (r + 2 < rounds) load_round(wa, sa, mem, r + 2, warp, lane, g, tile, KG);
      compute_round(acc, wb, sb, mem, code2, x, xr, xs, L, r + 1, warp, t, r0, KG);
    }
  }
  __syncthreads();
  float* red = (float*)lut;  // [member][warp][value][lane]
#pragma unroll
  for (int p = 0; p < MEMBERS; p++)
#pragma unroll
    for (int c = 0; c < COLS; c++)
#pragma unroll
      for (int v = 0; v < 4; v++) red[((p * WARPS + warp) * COLS * 4 + c * 4 + v) * 32 + lane] = acc[p][c][v];
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int c = 0; c < COLS; c++)
#pragma unroll
      for (int v = 0; v < 4; v++) {
        float tot[MEMBERS];
#pragma unroll
        for (int p = 0; p < MEMBERS; p++) {
          tot[p] = 0.f;
          for (int i = 0; i < WARPS; i++) tot[p] += red[((p * WARPS + i) * COLS * 4 + c * 4 + v) * 32 + lane];
        }
        const int m = c * 8 + 2 * t + (v & 1);
        const long row = r0 + (v >> 1) * 8;
#if SILU
        const float y = tot[0] / (1.f + __expf(-tot[0])) * tot[1];
#else
        const float y = tot[0];
#endif
        if (m < M) out[(long)m * n + row] = to16(y);
      }
  }
}
"""


def available(device: torch.device) -> str | None:
    """None when the kernel can run on `device`; otherwise why not."""
    if device.type != "cuda":
        return "it needs a CUDA GPU"
    missing = nvrtc.unavailable()
    if missing:
        return missing
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "it needs bf16 tensor cores (compute capability 8.0 or newer)"
    return None


def supported(w: Packed, dtype: torch.dtype) -> bool:
    """Whether this weight fits the layout: blocks of 64, whole 16x64 tiles, 16-bit activations."""
    n, k = w.shape
    return (dtype in (torch.bfloat16, torch.float16) and w.blocksize == BLOCKSIZE and n % TILE_ROWS == 0
            and k % BLOCKSIZE == 0 and w.code.numel() == 16 and (not w.nested or w.block2 == 256)
            and w.data.numel() * 2 == n * k)


def _tiles(n: int, k: int) -> tuple[int, ...]:
    """The stored bytes [N, K/2] seen as [N/16, 2 (row half h), 8 (row g), K/64 (block), 4 (lane t), 4 (word j),
    2 (q)]: row = 16·tile + 8·h + g, byte = 32·block + 8·t + 2·j + q."""
    return n // 16, 2, 8, k // 64, 4, 4, 2


# The shuffled order: (tile, block, g, t, j, q, h): lane 4g + t, word j, byte 2q + h of its 16 bytes.
_SHUFFLE = (0, 3, 2, 4, 5, 6, 1)
_UNSHUFFLE = tuple(_SHUFFLE.index(i) for i in range(7))


def shuffled(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """A shuffled copy of the stored bytes (uint8 [N·K/2])."""
    return data.view(_tiles(n, k)).permute(*_SHUFFLE).reshape(-1)


def unshuffled(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The stored bytes back from a shuffled copy (uint8 [N·K/2])."""
    tiles = _tiles(n, k)
    return data.view([tiles[i] for i in _SHUFFLE]).permute(*_UNSHUFFLE).reshape(-1)


def shuffled_absmax(absmax: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The absmax [N, K/64] as [N/16, K/64, 16]: the 16 rows of a warp's tile side by side, one load."""
    return absmax.view(n // 16, 16, k // 64).transpose(1, 2).reshape(-1)


def unshuffled_absmax(absmax: torch.Tensor, n: int, k: int) -> torch.Tensor:
    return absmax.view(n // 16, k // 64, 16).transpose(1, 2).reshape(-1)


def shuffle_(w: Packed) -> None:
    """Permutes the weight's stored bytes and absmax in place into the kernel's layout (a transient copy of
    one layer's bytes)."""
    w.data.copy_(shuffled(w.data, *w.shape))
    w.absmax.copy_(shuffled_absmax(w.absmax, *w.shape))


def unshuffle_(w: Packed) -> None:
    """Restores the stored bytes and absmax exactly."""
    w.data.copy_(unshuffled(w.data, *w.shape))
    w.absmax.copy_(unshuffled_absmax(w.absmax, *w.shape))


def _args(w: Packed, out: torch.Tensor | None) -> list:
    return [w.words, w.absmax, w.absmax2 if w.nested else w.absmax, w.offset if w.nested else w.absmax,
            out if out is not None else w.absmax, w.shape[0]]


def launch(x2: torch.Tensor, weights: list[Packed], outs: list[torch.Tensor], silu_pair: bool = False,
           warps: int = WARPS, unroll: int = UNROLL) -> None:
    """x2 ([M <= 16, K], 16-bit, rows 16-byte aligned) through up to three shuffled weights that share one
    code table and nesting, into outs ([M, N] each); with `silu_pair`, weights 0 and 1 are gate and up and
    outs[0] gets silu(gate) · up."""
    m, k = x2.shape
    first = weights[0]
    source = SOURCE % dict(warps=warps, cols=1 if m <= 8 else 2, nested=int(first.nested), silu=int(silu_pair),
                           f16=int(x2.dtype == torch.float16), unroll=unroll)
    kernel = nvrtc.kernel(source, "w4mma", x2.device)
    segments = [_args(w, outs[i] if i < len(outs) else None) for i, w in enumerate(weights)]
    while len(segments) < 3:
        segments.append([*segments[0][:5], 0])
    tiles = first.shape[0] // TILE_ROWS if silu_pair else sum(w.shape[0] for w in weights) // TILE_ROWS
    kernel(grid=(tiles, 1, 1), block=(warps * 32, 1, 1),
           args=[x2, first.code, first.code2 if first.nested else first.code, *segments[0], *segments[1],
                 *segments[2], m, k, x2.stride(0)])


def rows_ready(x: torch.Tensor) -> torch.Tensor:
    """x as [M, K] rows the kernel can load 16 bytes at a time."""
    x2 = rows_of(x)
    return x2.contiguous() if x2.stride(0) % 8 or x2.data_ptr() % 16 else x2


def apply(x: torch.Tensor, w: Packed, variant: tuple[int, int] = (WARPS, UNROLL)) -> torch.Tensor:
    """A shuffled 4-bit layer's forward for 1-16 rows."""
    return apply_group(x, [w], False, variant)[0]


@torch.library.custom_op("llm_app::w4mma_group", mutates_args=())
def group(x: torch.Tensor, datas: list[torch.Tensor], absmaxes: list[torch.Tensor], code: torch.Tensor,
          rows: list[int], absmax2s: list[torch.Tensor], code2: torch.Tensor | None, offsets: list[torch.Tensor],
          silu_pair: bool, warps: int, unroll: int) -> list[torch.Tensor]:
    """Up to 16 rows through one to three shuffled layers that share them, in one launch (`Packed`'s fields,
    flattened for torch.library, so that torch.compile and CUDA graphs hold it); `absmax2s` and `offsets` are
    empty when the absmax are plain fp32."""
    k = x.shape[-1]
    nested = bool(absmax2s)
    weights = [Packed(d, a, code, (n, k), BLOCKSIZE, absmax2s[i] if nested else None, code2 if nested else None,
                      offsets[i] if nested else None) for i, (d, a, n) in enumerate(zip(datas, absmaxes, rows))]
    x2 = rows_ready(x)
    outs = outputs(x2, rows, silu_pair)
    launch(x2, weights, outs, silu_pair, warps, unroll)
    return [o.reshape(*x.shape[:-1], o.shape[-1]) for o in outs]


@group.register_fake
def _(x, datas, absmaxes, code, rows, absmax2s, code2, offsets, silu_pair, warps, unroll):
    return outputs(x, rows, silu_pair)


def apply_group(x: torch.Tensor, weights: list[Packed], silu_pair: bool,
                variant: tuple[int, int] = (WARPS, UNROLL)) -> list[torch.Tensor]:
    first = weights[0]
    return group(x, [w.data for w in weights], [w.absmax for w in weights], first.code, [w.shape[0] for w in weights],
                 [w.absmax2 for w in weights] if first.nested else [], first.code2,
                 [w.offset for w in weights] if first.nested else [], silu_pair, *variant)


def emulate(x: torch.Tensor, w: Packed) -> torch.Tensor:
    """The kernel's algorithm in PyTorch, register by register (fp32, CPU or GPU): `w` holds shuffled bytes.

    For each 16x64 tile and each of its four K steps, every lane's A and B registers are formed as the
    kernel forms them (A: table entries of the bytes of its word j; B: activation words 2j and 2j + 1 of
    its 16), then placed where `mma.sync` m16n8k16 defines each register's elements to be, multiplied,
    scaled by the two rows' absmax and summed. Agreeing with `w4a16.reference` on the unshuffled bytes
    checks the layout, the K permutation and the fragment mapping without a GPU."""
    n, k = w.shape
    m = x.shape[0]
    kg_count, tiles = k // 64, n // 16
    entries = torch.arange(256)
    pairs = torch.stack([w.code.float().cpu()[entries >> 4], w.code.float().cpu()[entries & 15]], dim=1)
    words = w.data.cpu().view(tiles, kg_count, 32, 4, 4).long()  # tile, block, lane, word j, byte
    absmax = w.absmax.float().cpu()  # shuffled: [tile, block, row]
    if w.nested:  # absmax2 by the stored (unshuffled) block number
        stored = shuffled_absmax(torch.arange(w.absmax.numel()), n, k)
        absmax = w.code2.cpu()[w.absmax.cpu().long()] * w.absmax2.cpu()[stored // 256] + w.offset.cpu()
    absmax = absmax.view(tiles, kg_count, 16)
    xf = torch.zeros(16, k)
    xf[:m] = x.float().cpu()
    out = torch.zeros(tiles, 16, 16)  # tile, weight row, activation row
    for j in range(4):
        a = torch.zeros(tiles, kg_count, 16, 16)  # A of MMA j: 16 weight rows x 16 K positions
        b = torch.zeros(kg_count, 16, 16)  # B: 16 K positions x 16 activation rows (two n8 MMAs)
        for lane in range(32):
            g, t = lane // 4, lane % 4
            for reg, (row, col) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]):
                a[:, :, row, col:col + 2] = pairs[words[:, :, lane, j, reg]]
            for reg, row in enumerate([2 * t, 2 * t + 8]):  # activation words 2j + reg of lane t's 16 per block
                for half in range(2):
                    where = torch.arange(kg_count) * 64 + 16 * t + 4 * j + 2 * reg + half
                    for c in range(2):  # column g of MMA c is activation row 8c + g
                        b[:, row + half, 8 * c + g] = xf[8 * c + g, where]
        part = torch.einsum("tbrk,bkm->tbrm", a, b)
        out += (part * absmax[..., None]).sum(1)
    return out.reshape(n, 16).T[:m]
