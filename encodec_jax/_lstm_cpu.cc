// An LSTM layer as one XLA:CPU custom call (see encodec_jax/cpu_lstm.py for why).
//
// Each step t computes, for every batch row b and unit u,
//   gates[b, t, g, u] = (gx[b, t, g, u] + bias[g, u]) + sum_k h[b, t - 1, k] * w_hh[g, u, k]
// (g = i, f, g, o), then the cell, where gx[b, t, g, u] = sum_k x[b, t, k] * w_ih[g, u, k] is the
// input projection. The projection is computed here too, by the same register tiles, for a
// chunk of steps at a time just before them: as XLA's dot over all steps it was a [B, T, 4H]
// array written to memory and read back, and that dot ran at 60-75 % of the FMA peak from
// batch 8, against the tiles' 80-90 %. The bias is added in the step, to the projection, as XLA
// added it before. XLA's dot packs the [H, 4H] recurrent weight on every step (it cannot know
// the weight is the same each step), so a step moves the weight about three times; here both
// weights are packed once per call by the layer itself (`lstm_layer_packing`), or once for many
// calls by the caller (`lstm_pack`, for streaming): units of up to three blocks of L units, L the
// width of one vector register, gate-major, then contraction-major (see `Unit`). Every step
// reads w_hh once per tile of rows, whole cache lines at a time, applying the cell as soon as a
// unit's gates are summed.
// The units of a step (or of a chunk's projection) are shared between the calling thread and
// one task on XLA's intra-op pool, half each, and either takes what the other has not claimed,
// so a step never waits on a thread that has not started: the caller alone can finish every
// unit.
//
// There is one entry point per instruction set (AVX-512, AVX2 + FMA, and a generic one), each
// compiled for it and offered only where the CPU has it. Every sum runs over k in ascending
// order, one fused multiply-add per term (the generic entry point rounds each product unless
// the compiler targets FMA), whatever the batch size, the position of a row in the batch or the
// number of threads: a row's result depends on nothing else.

#include <Python.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kGates = 4;

#define INLINE inline __attribute__((always_inline))

#if defined(__x86_64__)
#define CPU_RELAX() __builtin_ia32_pause()
#else
#define CPU_RELAX() std::this_thread::yield()
#endif

// Waits until `ready()`: a short spin, then yielding the core, so a waiting thread does not take
// the time of the thread it waits for when there are more threads than cores.
template <typename F>
void wait_until(F ready) {
  for (int spins = 0; !ready(); ++spins) {
    if (spins < 2000)
      CPU_RELAX();
    else
      std::this_thread::yield();
  }
}

// L float32 lanes: 16 fill an AVX-512 register, 8 an AVX2 one, 4 an SSE or NEON one.
template <int L>
struct Lanes {
  typedef float Vec __attribute__((vector_size(L * sizeof(float))));
  typedef int32_t IVec __attribute__((vector_size(L * sizeof(int32_t))));
};

template <typename V>
INLINE V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename V>
INLINE void store(float* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}

// x in every lane. (`V{} + x` would add zero first, in a separate instruction: the compiler may
// not drop it, as it turns -0 into +0.)
template <typename V>
INLINE V splat(float x) {
  typedef int32_t IV __attribute__((vector_size(sizeof(V))));
  return __builtin_shuffle(V{x}, IV{});  // lane 0 into every lane
}

// exp(x) for float32: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor series to r^7
// (truncation below 5e-9 relative), times 2^n through the exponent bits. Inputs are clamped to
// [-87, 88] so 2^n stays a normal float; NaN passes through the comparisons unchanged.
template <typename V, typename IV>
INLINE V vexp(V x) {
  x = x > splat<V>(88.0f) ? splat<V>(88.0f) : x;
  x = x < splat<V>(-87.0f) ? splat<V>(-87.0f) : x;
  // n = round(x / ln 2): adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
  const V n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  // ln 2 split so n * ln2_hi is exact for |n| < 2^8.
  const V r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  V p = splat<V>(1.0f / 5040);
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const IV bits = (__builtin_convertvector(n, IV) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

template <typename V, typename IV>
INLINE V vsigmoid(V x) {
  return 1.0f / (1.0f + vexp<V, IV>(-x));
}

// tanh(x) = 2 sigmoid(2x) - 1: saturates to +-1 exactly, absolute error a few 1e-8.
template <typename V, typename IV>
INLINE V vtanh(V x) {
  return 2.0f * vsigmoid<V, IV>(2.0f * x) - 1.0f;
}

// One step of the recurrence, batch-major: row b of each array starts `b * <its stride>` floats
// after its pointer.
struct Step {
  int64_t batch, hidden;  // hidden: padded to a multiple of 16
  const float* w;         // w_hh packed (see `Projection::w`), contraction length `hidden`
  const float* gx;        // this step's input projection, [4, H] per row
  const float* bias;      // [4, H]: b_ih + b_hh
  const float* h_prev;    // [H] per row
  const float* c_prev;    // [H] per row
  float* h;               // [H] per row
  float* c;               // [H] per row
  float* gates;           // [4, H] per row, or null: the summed pre-activations, for the gradient
  // Row strides: gx; gates; h_prev; c_prev; h; c.
  int64_t gx_stride, gates_stride, h_prev_stride, c_prev_stride, h_stride, c_stride;
};

// The input projection of `steps` consecutive steps of every row, x @ w_ih: its rows are
// (b, t) for b < batch, t < steps, b-major; row (b, t) reads `x + b * x_stride + t * inputs`
// and writes `[4, hidden]` at `gx + (b * gx_rows + t) * 4 * hidden`.
struct Projection {
  int64_t batch, steps, hidden, inputs;  // inputs: the contraction length, padded to 16
  const float* w;  // packed: see `Unit`
  const float* x;
  int64_t x_stride, gx_rows;
  float* gx;
};

// The packed weights come in units of up to 3 blocks of L units each (L: the kernel's lanes):
// unit u holds blocks 3u .. 3u + S - 1 (S = 3, or fewer in the last unit) as
// [gate, k, block in unit, L], gate-major then contraction-major, starting 3u * 4 * K * L floats
// into the weight. A pass over one gate of a unit reads one stream of S * L floats per k, and a
// tile of 4 rows sums 4 x 3 = 12 vectors at a time: 12 independent sums keep the two 4-cycle
// FMA pipes busy where the 8 of 4 rows x 2 gates of one block did not (benchmarks/RESULTS.md).
constexpr int kBlocksPerUnit = 3;

struct Unit {
  int64_t index, blocks;  // blocks: S
  static INLINE Unit of(int64_t index, int64_t hidden_blocks) {
    return {index, std::min<int64_t>(kBlocksPerUnit, hidden_blocks - index * kBlocksPerUnit)};
  }
  template <int L>
  INLINE const float* weights(const float* w, int64_t K) const {
    return w + index * kBlocksPerUnit * kGates * K * L;
  }
};

// The number of units the `hidden` (a multiple of L) units make.
template <int L>
constexpr int64_t units_of(int64_t hidden) {
  return (hidden / L + kBlocksPerUnit - 1) / kBlocksPerUnit;
}

// sums[g][s][r] = sum over k < K of in[r][k] * w[gate g, k, block s] for one unit of S blocks, `P`
// gates (1, 2 or 4) per pass over the unit's weights `w`, in ascending k with one fused
// multiply-add per term. A tile's rows x P x S accumulators, the weight vectors it keeps and a
// broadcast should fit the registers, and rows x P x S should be at least 8: a fused multiply-add
// takes 4 cycles and two issue per cycle, so fewer independent sums leave the FMA units idle.
template <int L, int rows, int P, int S>
INLINE void gate_sums(const float* w, int64_t K, const float* const (&in)[rows],
                      typename Lanes<L>::Vec (&sums)[kGates][S][rows]) {
  typedef typename Lanes<L>::Vec V;
  static_assert(P == 1 || P == 2 || P == 4, "a pass sums one gate, two or all four");
  for (int pass = 0; pass < kGates / P; ++pass) {
    V acc[P][S][rows];
    for (int g = 0; g < P; ++g)
      for (int b = 0; b < S; ++b)
        for (int r = 0; r < rows; ++r) acc[g][b][r] = V{};
    for (int64_t k = 0; k < K; ++k) {
      V wk[P][S];
      for (int g = 0; g < P; ++g)
        for (int b = 0; b < S; ++b) wk[g][b] = load<V>(w + (((pass * P + g) * K + k) * S + b) * L);
#if defined(__x86_64__)
      // Keep the weight vectors in registers, as many as fit beside the accumulators and the
      // broadcast (16 registers below AVX-512, 32 with it). Left alone, GCC folds their loads
      // into every row's multiply-add, one load per FMA, more than the load ports serve (11 %
      // at 3 rows x 4 gates).
      constexpr int registers = L == 16 ? 32 : 16;
      constexpr int pinned = std::max(0, std::min(P * S, registers - rows * P * S - 1));
      for (int i = 0; i < pinned; ++i) __asm__("" : "+x"(wk[i / S][i % S]));
#endif
      for (int r = 0; r < rows; ++r) {
        const V xk = splat<V>(in[r][k]);
        for (int g = 0; g < P; ++g)
          for (int b = 0; b < S; ++b) acc[g][b][r] += wk[g][b] * xk;
      }
    }
    for (int g = 0; g < P; ++g)
      for (int b = 0; b < S; ++b)
        for (int r = 0; r < rows; ++r) sums[pass * P + g][b][r] = acc[g][b][r];
  }
}

// Gates per pass for a tile of `rows` rows: the fewest that give at least 9 sums over a whole
// unit (4 gates at 1 row, 2 at 2 rows, 1 from 3 rows), each pass a stream of its own.
template <int rows>
constexpr int kGatesPerPass = rows * kBlocksPerUnit >= 9       ? 1
                              : rows * 2 * kBlocksPerUnit >= 9 ? 2
                                                               : 4;

// Rows [b0, b0 + rows) of one step in one unit of S blocks: the gates' sums, then the cell.
template <int L>
struct StepRows {
  const Step& s;
  Unit unit;

  template <int rows, int S>
  INLINE void run(int64_t b0) const {
    typedef typename Lanes<L>::Vec V;
    typedef typename Lanes<L>::IVec IV;
    const int64_t H = s.hidden;
    const float* in[rows];
    for (int r = 0; r < rows; ++r) in[r] = s.h_prev + (b0 + r) * s.h_prev_stride;
    V sums[kGates][S][rows];
    gate_sums<L, rows, kGatesPerPass<rows>, S>(unit.weights<L>(s.w, H), H, in, sums);
    for (int r = 0; r < rows; ++r) {
      const int64_t b = b0 + r;
      for (int block = 0; block < S; ++block) {
        const int64_t u = (unit.index * kBlocksPerUnit + block) * L;
        V pre[kGates];
        for (int g = 0; g < kGates; ++g) {
          const int64_t at = g * H + u;
          const V projected = load<V>(s.gx + b * s.gx_stride + at) + load<V>(s.bias + at);
          pre[g] = projected + sums[g][block][r];
          if (s.gates) store(s.gates + b * s.gates_stride + at, pre[g]);
        }
        const V c_prev = load<V>(s.c_prev + b * s.c_prev_stride + u);
        const V c =
            vsigmoid<V, IV>(pre[1]) * c_prev + vsigmoid<V, IV>(pre[0]) * vtanh<V, IV>(pre[2]);
        store(s.c + b * s.c_stride + u, c);
        store(s.h + b * s.h_stride + u, vsigmoid<V, IV>(pre[3]) * vtanh<V, IV>(c));
      }
    }
  }
};

// Rows [r0, r0 + rows) of a projection in one unit of S blocks.
template <int L>
struct ProjectionRows {
  const Projection& p;
  Unit unit;

  template <int rows, int S>
  INLINE void run(int64_t r0) const {
    typedef typename Lanes<L>::Vec V;
    const float* in[rows];
    float* out[rows];
    for (int r = 0; r < rows; ++r) {
      const int64_t b = (r0 + r) / p.steps, t = (r0 + r) % p.steps;
      in[r] = p.x + b * p.x_stride + t * p.inputs;
      out[r] = p.gx + (b * p.gx_rows + t) * kGates * p.hidden + unit.index * kBlocksPerUnit * L;
    }
    V sums[kGates][S][rows];
    gate_sums<L, rows, kGatesPerPass<rows>, S>(unit.weights<L>(p.w, p.inputs), p.inputs, in, sums);
    for (int r = 0; r < rows; ++r)
      for (int g = 0; g < kGates; ++g)
        for (int block = 0; block < S; ++block)
          store(out[r] + g * p.hidden + block * L, sums[g][block][r]);
  }
};

// One tile of `rows` rows from `first`, 1 <= rows <= max_rows, as the instance compiled for
// that many rows and the unit's number of blocks.
template <int max_rows, typename Rows>
INLINE void tile(const Rows& tile_rows, int64_t first, int64_t rows) {
  if constexpr (max_rows > 0) {
    if (rows != max_rows)
      tile<max_rows - 1>(tile_rows, first, rows);
    else if (tile_rows.unit.blocks == 3)
      tile_rows.template run<max_rows, 3>(first);
    else if (tile_rows.unit.blocks == 2)
      tile_rows.template run<max_rows, 2>(first);
    else
      tile_rows.template run<max_rows, 1>(first);
  }
}

// `n` rows of one unit, in as few tiles of at most `max_rows` as there can be, their sizes as
// even as they can be (9 rows in tiles of 4: 3 + 3 + 3): every tile is one pass over the
// unit's weights, and a small tile does little work for its pass.
template <int max_rows, typename Rows>
INLINE void run_tiles(const Rows& tile_rows, int64_t n) {
  const int64_t tiles = (n + max_rows - 1) / max_rows;
  for (int64_t i = 0, first = 0; i < tiles; ++i) {
    const int64_t rows = n / tiles + (i < n % tiles);
    tile<max_rows>(tile_rows, first, rows);
    first += rows;
  }
}

// A unit of the work a layer is split into: one step of the recurrence, or the input projection
// of the steps that follow it.
struct Job {
  bool projection;
  Step step;
  Projection project;
};

template <int L, int max_rows>
INLINE void run_job_unit(const Job& job, int64_t unit) {
  if (job.projection)
    run_tiles<max_rows>(ProjectionRows<L>{job.project, Unit::of(unit, job.project.hidden / L)},
                        job.project.batch * job.project.steps);
  else
    run_tiles<max_rows>(StepRows<L>{job.step, Unit::of(unit, job.step.hidden / L)},
                        job.step.batch);
}

typedef void (*UnitFn)(const Job&, int64_t);

// One entry point per instruction set, each with the block width and largest row tile that fit
// its registers (measured: benchmarks/RESULTS.md); the extension offers those the running CPU
// has. All sum in the same order, and the two with FMA give the same bits.
#if defined(__x86_64__)
// 32 registers: tiles of up to 8 rows (24 accumulators), so batch 8 is one pass, 16 two.
struct Avx512 {
  static constexpr int lanes = 16;
  __attribute__((target("avx512f,avx2,fma"))) static void run_unit(const Job& job, int64_t unit) {
    run_job_unit<lanes, 8>(job, unit);
  }
};

// 16 registers: 4 rows x 3 blocks of accumulators, 3 weight vectors and a broadcast.
struct Avx2 {
  static constexpr int lanes = 8;
  __attribute__((target("avx2,fma"))) static void run_unit(const Job& job, int64_t unit) {
    run_job_unit<lanes, 4>(job, unit);
  }
};
#endif

// Tiles of up to 2 rows: under SSE2 (no FMA: a product needs a register and an addition of its
// own) larger tiles spill.
struct Generic {
  static constexpr int lanes = 4;
  static void run_unit(const Job& job, int64_t unit) { run_job_unit<lanes, 2>(job, unit); }
};

// A counter alone on its cache line, so that the two threads' counters do not share one.
struct alignas(64) Counter {
  std::atomic<int64_t> value{0};
};

// The units of a job are split in two halves, one per thread (0: the caller, 1: its helper).
// Each thread claims its own half's units from its own counter, a cache line no other thread
// touches, and then takes what is left of the other half, so the caller can still finish a job
// alone. A shared counter for every unit moved its cache line between the cores once per unit
// (tens of them per step); this way each thread works on the same units job after job, keeps
// its counter's cache line, and reports its units once per job (4-10 % on the recurrence).
struct JobSync {
  Counter next[2];  // next unit to claim in each half, counted from the half's start
  Counter done;     // units finished
};

// What the calling thread and its helper task share. The helper holds it by shared_ptr, so it
// stays valid if the task only starts after the call has returned (it then finds no work).
struct Shared {
  explicit Shared(size_t jobs) : sync(jobs), jobs(jobs) {}
  std::vector<JobSync> sync;
  std::vector<Job> jobs;
  std::atomic<int64_t> published{-1};
  std::atomic<bool> finished{false};
  std::vector<float> gx;     // the projection of the steps being run, [B, chunk, 4, H]
  std::vector<float> cells;  // two steps' cell states, alternating, when only the last is returned
  int64_t units = 0;
  UnitFn run_unit = nullptr;
};

// Runs units of job j until none is left to claim: thread `me`'s own half first, then the other.
void work_on(Shared& shared, int64_t j, int me) {
  JobSync& sync = shared.sync[j];
  const int64_t half = (shared.units + 1) / 2;
  int64_t finished = 0;
  for (const int owner : {me, 1 - me}) {
    const int64_t start = owner == 0 ? 0 : half;
    const int64_t count = owner == 0 ? half : shared.units - half;
    for (;;) {
      const int64_t i = sync.next[owner].value.fetch_add(1, std::memory_order_relaxed);
      if (i >= count) break;
      shared.run_unit(shared.jobs[j], start + i);
      ++finished;
    }
  }
  if (finished) sync.done.value.fetch_add(finished, std::memory_order_release);
}

void helper(const std::shared_ptr<Shared>& shared, std::thread::id caller) {
  // A pool that cannot take the task runs it at once in the caller, before any job is
  // published: waiting there would never end, and the caller does every block itself anyway.
  if (std::this_thread::get_id() == caller) return;
  int64_t j = 0;
  const int64_t last = static_cast<int64_t>(shared->jobs.size()) - 1;
  while (j <= last) {
    wait_until([&] {
      return shared->finished.load(std::memory_order_acquire) ||
             shared->published.load(std::memory_order_acquire) >= j;
    });
    if (shared->finished.load(std::memory_order_acquire)) return;
    j = shared->published.load(std::memory_order_acquire);  // a late start skips finished jobs
    work_on(*shared, j, 1);
    ++j;
  }
}

// Rows of input projection computed per chunk of steps (the chunk is this many rows over the
// batch size, rounded up). Each chunk's projection reads all of w_ih, which at 1024 units pushes
// w_hh out of a 32 MB L3 cache; the steps after it fetch w_hh from memory again. Measured, 500
// steps, two runs (benchmarks/RESULTS.md): against XLA's dot over all steps, 48 rows cost 6-38 %
// at 1024 units, batch 1-4; 256 rows stayed within 7 % there and gained 4-17 % at batch 16.
constexpr int64_t kChunkRows = 256;

// The layer's sizes: x [B, T, C] and h0 [B, H] (C and H already padded to multiples of the
// lanes), checked against every operand and result but the weights.
struct Sizes {
  int64_t B, T, C, H;
};

template <typename Kernel>
ffi::Error layer_sizes(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::F32>& bias,
                       const ffi::Buffer<ffi::F32>& h0, const ffi::Buffer<ffi::F32>& c0,
                       ffi::ResultBuffer<ffi::F32>& hs, ffi::ResultBuffer<ffi::F32>& cs,
                       ffi::ResultBuffer<ffi::F32>& gates, bool training, Sizes& sizes) {
  const auto dims = x.dimensions();  // [B, T, C]
  const auto state_dims = h0.dimensions();  // [B, H]
  if (dims.size() != 3 || state_dims.size() != 2 || dims[0] != state_dims[0] ||
      dims[2] % Kernel::lanes != 0 || state_dims[1] % Kernel::lanes != 0)
    return ffi::Error::InvalidArgument(
        "lstm_layer: x must be [B, T, C] and h0 [B, H], C and H multiples of the lanes");
  const int64_t B = dims[0], T = dims[1], C = dims[2], H = state_dims[1];
  const int64_t cs_steps = training ? T : 1;
  if (bias.element_count() != static_cast<size_t>(kGates * H) ||
      c0.element_count() != static_cast<size_t>(B * H) ||
      hs->element_count() != static_cast<size_t>(B * T * H) ||
      cs->element_count() != static_cast<size_t>(B * cs_steps * H) ||
      gates->element_count() != static_cast<size_t>(training ? B * T * kGates * H : 0))
    return ffi::Error::InvalidArgument("lstm_layer: an operand or result of the wrong size");
  sizes = {B, T, C, H};
  return ffi::Error::Success();
}

// One LSTM layer. Inputs x [B, T, C], w_ih and w_hh packed, bias [4, H], h0 and c0 [B, H].
// Outputs hs [B, T, H]; with `training`, every step's cell state [B, T, H] and summed
// pre-activations [B, T, 4, H] (the backward pass needs both); without, the last cell state
// only, [B, 1, H], and no gates. The steps run in chunks: the input projection of a chunk's
// steps, then its steps one by one, so the projection is read back from the cache rather than
// from a [B, T, 4H] array in memory.
template <typename Kernel>
void run_layer(ffi::ThreadPool& pool, const Sizes& sizes, const float* x, const float* w_ih,
               const float* w_hh, const float* bias, const float* h0, const float* c0,
               float* hs, float* cs, float* gates, bool training) {
  const int64_t B = sizes.B, T = sizes.T, C = sizes.C, H = sizes.H;
  if (T == 0 || B == 0) return;

  const int64_t chunk = std::min(T, (kChunkRows + B - 1) / B);
  const int64_t chunks = (T + chunk - 1) / chunk;
  auto shared = std::make_shared<Shared>(static_cast<size_t>(T + chunks));
  shared->units = units_of<Kernel::lanes>(H);
  shared->run_unit = Kernel::run_unit;
  shared->gx.resize(B * chunk * kGates * H);
  if (!training) shared->cells.resize(2 * B * H);
  const Step* previous = nullptr;
  for (int64_t t = 0, j = 0; t < T; ++t) {
    if (t % chunk == 0) {
      Job& job = shared->jobs[j++];
      job.projection = true;
      Projection& p = job.project;
      p.batch = B;
      p.steps = std::min(chunk, T - t);
      p.hidden = H;
      p.inputs = C;
      p.w = w_ih;
      p.x = x + t * C;
      p.x_stride = T * C;
      p.gx_rows = chunk;
      p.gx = shared->gx.data();
    }
    Job& job = shared->jobs[j++];
    job.projection = false;
    Step& s = job.step;
    s.batch = B;
    s.hidden = H;
    s.w = w_hh;
    s.bias = bias;
    s.gx = shared->gx.data() + (t % chunk) * kGates * H;
    s.gx_stride = chunk * kGates * H;
    s.gates = training ? gates + t * kGates * H : nullptr;
    s.gates_stride = T * kGates * H;
    s.h = hs + t * H;
    s.h_stride = T * H;
    s.h_prev = t == 0 ? h0 : s.h - H;
    s.h_prev_stride = t == 0 ? H : T * H;
    if (training) {
      s.c = cs + t * H;
      s.c_stride = T * H;
    } else {  // steps alternate between two buffers; the last writes the result
      s.c = t == T - 1 ? cs : shared->cells.data() + (t % 2) * B * H;
      s.c_stride = H;
    }
    s.c_prev = t == 0 ? c0 : previous->c;
    s.c_prev_stride = t == 0 ? H : previous->c_stride;
    previous = &s;
  }
  // One helper is worth its scheduling (a few microseconds) when a step has real work.
  if (pool.num_threads() > 1 && shared->units > 1 && B * H * H >= (1 << 18))
    pool.Schedule([shared, caller = std::this_thread::get_id()] { helper(shared, caller); });
  const int64_t jobs = static_cast<int64_t>(shared->jobs.size());
  for (int64_t j = 0; j < jobs; ++j) {
    shared->published.store(j, std::memory_order_release);
    work_on(*shared, j, 0);
    wait_until([&] {
      return shared->sync[j].done.value.load(std::memory_order_acquire) == shared->units;
    });
  }
  shared->finished.store(true, std::memory_order_release);
}

// Columns k..k+3 of 4 rows (4 inputs of 4 units) as 4 rows of 4 units, one per input.
INLINE void transpose4(const float* rows, int64_t row_stride, float* out, int64_t out_stride) {
  typedef Lanes<4>::Vec V;
  typedef Lanes<4>::IVec I;
  const V r0 = load<V>(rows), r1 = load<V>(rows + row_stride);
  const V r2 = load<V>(rows + 2 * row_stride), r3 = load<V>(rows + 3 * row_stride);
  const V t0 = __builtin_shuffle(r0, r1, I{0, 4, 1, 5});  // r0[0] r1[0] r0[1] r1[1]
  const V t1 = __builtin_shuffle(r0, r1, I{2, 6, 3, 7});  // r0[2] r1[2] r0[3] r1[3]
  const V t2 = __builtin_shuffle(r2, r3, I{0, 4, 1, 5});
  const V t3 = __builtin_shuffle(r2, r3, I{2, 6, 3, 7});
  store(out, __builtin_shuffle(t0, t2, I{0, 1, 4, 5}));
  store(out + out_stride, __builtin_shuffle(t0, t2, I{2, 3, 6, 7}));
  store(out + 2 * out_stride, __builtin_shuffle(t1, t3, I{0, 1, 4, 5}));
  store(out + 3 * out_stride, __builtin_shuffle(t1, t3, I{2, 3, 6, 7}));
}

// w [4H, C] (PyTorch's layout: gate-major rows i, f, g, o; inputs contiguous; H <= hidden,
// C <= inputs) laid out as the kernel with blocks of L units reads it (see `Unit`), zero-padded
// to `hidden` units and `inputs` inputs per gate: 4 * hidden * inputs floats at `dst`. A block
// is a transpose of its L rows, done in 4 x 4 tiles (a 16-byte read from each of 4 rows, four
// 16-byte writes), so only 4 rows are read at a time: a tile of a unit's 24 rows of 1024 inputs,
// 4 KB apart, ran at 1 GB/s, 2.8x slower at 1024 units (benchmarks/RESULTS.md); XLA's fused
// permutation was slower still. Padding and a last, partial block go one value at a time.
template <int L>
void pack_weight(const float* src, int64_t H, int64_t C, int64_t hidden, int64_t inputs,
                 float* dst) {
  const int64_t units = units_of<L>(hidden);
  for (int64_t n = 0; n < units; ++n) {
    const Unit unit = Unit::of(n, hidden / L);
    float* out = dst + n * kBlocksPerUnit * kGates * inputs * L;  // [gate, k, block in unit, L]
    const int64_t width = unit.blocks * L;                        // the unit's hidden units
    for (int64_t g = 0; g < kGates; ++g)
      for (int64_t b = 0; b < unit.blocks; ++b) {
        const int64_t first = (n * kBlocksPerUnit + b) * L;  // the block's first unit
        float* to = out + g * inputs * width + b * L;
        int64_t k = 0;
        if (first + L <= H)
          for (; k + 4 <= C; k += 4)
            for (int64_t i = 0; i < L; i += 4)
              transpose4(src + (g * H + first + i) * C + k, C, to + k * width + i, width);
        for (; k < inputs; ++k)
          for (int64_t i = 0; i < L; ++i) {
            const int64_t u = first + i;
            to[k * width + i] = u < H && k < C ? src[(g * H + u) * C + k] : 0.0f;
          }
      }
  }
}

// The unpadded sizes (H, C) of a weight in PyTorch's layout, [4H, C], that pads to `hidden`
// units and `inputs` inputs; false if it cannot.
INLINE bool weight_sizes(const ffi::Buffer<ffi::F32>& w, int64_t hidden, int64_t inputs,
                         int64_t& H, int64_t& C) {
  const auto dims = w.dimensions();
  if (dims.size() != 2 || dims[0] % kGates != 0) return false;
  H = dims[0] / kGates;
  C = dims[1];
  return H <= hidden && C <= inputs;
}

// `run_layer` on weights `lstm_pack` laid out beforehand (streaming: once for many calls).
template <typename Kernel>
ffi::Error lstm_layer(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w_ih,
                      ffi::Buffer<ffi::F32> w_hh, ffi::Buffer<ffi::F32> bias,
                      ffi::Buffer<ffi::F32> h0, ffi::Buffer<ffi::F32> c0,
                      ffi::ResultBuffer<ffi::F32> hs, ffi::ResultBuffer<ffi::F32> cs,
                      ffi::ResultBuffer<ffi::F32> gates, bool training) {
  Sizes n;
  ffi::Error error = layer_sizes<Kernel>(x, bias, h0, c0, hs, cs, gates, training, n);
  if (error.failure()) return error;
  if (w_ih.element_count() != static_cast<size_t>(kGates * n.H * n.C) ||
      w_hh.element_count() != static_cast<size_t>(kGates * n.H * n.H))
    return ffi::Error::InvalidArgument("lstm_layer: a packed weight of the wrong size");
  run_layer<Kernel>(pool, n, x.typed_data(), w_ih.typed_data(), w_hh.typed_data(),
                    bias.typed_data(), h0.typed_data(), c0.typed_data(), hs->typed_data(),
                    cs->typed_data(), gates->typed_data(), training);
  return ffi::Error::Success();
}

// `lstm_layer` from the weights in PyTorch's layout, w_ih [4H, C] and w_hh [4H, H] (unpadded),
// packed first into buffers this thread keeps for its next call. Packed by `lstm_pack` in the
// same program, they were fresh XLA results, whose pages faulted in on every call: the pack
// took 2x longer there than here (benchmarks/RESULTS.md). Each thread has its own buffers, so
// concurrent calls on XLA's threads never share one; the helper that reads them works only
// while this call waits for it.
template <typename Kernel>
ffi::Error lstm_layer_packing(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> w_ih, ffi::Buffer<ffi::F32> w_hh,
                              ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> h0,
                              ffi::Buffer<ffi::F32> c0, ffi::ResultBuffer<ffi::F32> hs,
                              ffi::ResultBuffer<ffi::F32> cs, ffi::ResultBuffer<ffi::F32> gates,
                              bool training) {
  Sizes n;
  ffi::Error error = layer_sizes<Kernel>(x, bias, h0, c0, hs, cs, gates, training, n);
  if (error.failure()) return error;
  int64_t H, C, H_hh, C_hh;
  if (!weight_sizes(w_ih, n.H, n.C, H, C) || !weight_sizes(w_hh, n.H, n.H, H_hh, C_hh) ||
      H_hh != H || C_hh != H)
    return ffi::Error::InvalidArgument(
        "lstm_layer: the weights must be [4H, C] and [4H, H], padding to the state and input");
  thread_local std::vector<float> packed_ih, packed_hh;
  packed_ih.resize(kGates * n.H * n.C);
  packed_hh.resize(kGates * n.H * n.H);
  pack_weight<Kernel::lanes>(w_ih.typed_data(), H, C, n.H, n.C, packed_ih.data());
  pack_weight<Kernel::lanes>(w_hh.typed_data(), H, H, n.H, n.H, packed_hh.data());
  run_layer<Kernel>(pool, n, x.typed_data(), packed_ih.data(), packed_hh.data(),
                    bias.typed_data(), h0.typed_data(), c0.typed_data(), hs->typed_data(),
                    cs->typed_data(), gates->typed_data(), training);
  return ffi::Error::Success();
}

// `pack_weight` as an XLA custom call, into its result.
template <int L>
ffi::Error lstm_pack(ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> packed, int64_t hidden,
                     int64_t inputs) {
  int64_t H, C;
  if (!weight_sizes(w, hidden, inputs, H, C) || hidden % L != 0 ||
      packed->element_count() != static_cast<size_t>(kGates * hidden * inputs))
    return ffi::Error::InvalidArgument(
        "lstm_pack: w must be [4H, C], and the padded sizes and the result must hold it");
  pack_weight<L>(w.typed_data(), H, C, hidden, inputs, packed->typed_data());
  return ffi::Error::Success();
}

}  // namespace

// One handler per entry point; Python registers those the running CPU supports.
#define LSTM_HANDLER(name, function)                                       \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, function,                              \
                                ffi::Ffi::Bind()                             \
                                    .Ctx<ffi::ThreadPool>()                  \
                                    .Arg<ffi::Buffer<ffi::F32>>()            \
                                    .Arg<ffi::Buffer<ffi::F32>>()            \
                                    .Arg<ffi::Buffer<ffi::F32>>()            \
                                    .Arg<ffi::Buffer<ffi::F32>>()            \
                                    .Arg<ffi::Buffer<ffi::F32>>()            \
                                    .Arg<ffi::Buffer<ffi::F32>>()            \
                                    .Ret<ffi::Buffer<ffi::F32>>()            \
                                    .Ret<ffi::Buffer<ffi::F32>>()            \
                                    .Ret<ffi::Buffer<ffi::F32>>()            \
                                    .Attr<bool>("training"));

#define PACK_HANDLER(name, L)                                            \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, lstm_pack<L>,                        \
                                ffi::Ffi::Bind()                           \
                                    .Arg<ffi::Buffer<ffi::F32>>()          \
                                    .Ret<ffi::Buffer<ffi::F32>>()          \
                                    .Attr<int64_t>("hidden")               \
                                    .Attr<int64_t>("inputs"));

PACK_HANDLER(LstmPack16, 16)
PACK_HANDLER(LstmPack8, 8)
PACK_HANDLER(LstmPack4, 4)

#if defined(__x86_64__)
LSTM_HANDLER(LstmLayerAvx512, lstm_layer<Avx512>)
LSTM_HANDLER(LstmLayerAvx2, lstm_layer<Avx2>)
LSTM_HANDLER(LstmLayerPackingAvx512, lstm_layer_packing<Avx512>)
LSTM_HANDLER(LstmLayerPackingAvx2, lstm_layer_packing<Avx2>)
#endif
LSTM_HANDLER(LstmLayerGeneric, lstm_layer<Generic>)
LSTM_HANDLER(LstmLayerPackingGeneric, lstm_layer_packing<Generic>)

static PyMethodDef no_methods[] = {{nullptr, nullptr, 0, nullptr}};
static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_lstm_cpu",
                                 "An LSTM layer as an XLA:CPU custom call.", -1, no_methods};

// `kernels`: {name: (layer handler, packing layer handler, pack handler, lanes)}, the handlers as
// FFI capsules, for the entry points this CPU can run, fastest first; `lanes` is the width of
// the blocks its packed weights come in.
PyMODINIT_FUNC PyInit__lstm_cpu(void) {
  struct Kernel {
    const char* name;
    XLA_FFI_Handler* handler;
    XLA_FFI_Handler* packing;
    XLA_FFI_Handler* pack;
    long lanes;
    bool supported;
  };
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool fma = __builtin_cpu_supports("fma");
  const Kernel all[] = {
      {"avx512", LstmLayerAvx512, LstmLayerPackingAvx512, LstmPack16, Avx512::lanes,
       __builtin_cpu_supports("avx512f") && fma},
      {"avx2", LstmLayerAvx2, LstmLayerPackingAvx2, LstmPack8, Avx2::lanes,
       __builtin_cpu_supports("avx2") && fma},
      {"generic", LstmLayerGeneric, LstmLayerPackingGeneric, LstmPack4, Generic::lanes, true},
  };
#else
  const Kernel all[] = {
      {"generic", LstmLayerGeneric, LstmLayerPackingGeneric, LstmPack4, Generic::lanes, true}};
#endif
  PyObject* module = PyModule_Create(&module_def);
  PyObject* kernels = PyDict_New();
  if (module == nullptr || kernels == nullptr || PyModule_AddObject(module, "kernels", kernels) < 0) {
    Py_XDECREF(kernels);
    Py_XDECREF(module);
    return nullptr;
  }
  for (const Kernel& kernel : all) {
    if (!kernel.supported) continue;
    PyObject* layer = PyCapsule_New(reinterpret_cast<void*>(kernel.handler), nullptr, nullptr);
    PyObject* packing = PyCapsule_New(reinterpret_cast<void*>(kernel.packing), nullptr, nullptr);
    PyObject* pack = PyCapsule_New(reinterpret_cast<void*>(kernel.pack), nullptr, nullptr);
    PyObject* entry = layer && packing && pack
                          ? Py_BuildValue("(OOOl)", layer, packing, pack, kernel.lanes)
                          : nullptr;
    const bool added = entry != nullptr && PyDict_SetItemString(kernels, kernel.name, entry) == 0;
    Py_XDECREF(entry);
    Py_XDECREF(pack);
    Py_XDECREF(packing);
    Py_XDECREF(layer);
    if (!added) {
      Py_DECREF(module);
      return nullptr;
    }
  }
  return module;
}
