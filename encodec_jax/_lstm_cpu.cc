// The LSTM recurrence as one XLA:CPU custom call (see encodec_jax/cpu_lstm.py for why).
//
// Each step t computes, for every batch row b and unit u,
//   gates[b, t, g, u] = (gx[b, t, g, u] + bias[g, u]) + sum_k h[b, t - 1, k] * w_hh[g, u, k]
// (g = i, f, g, o), then the cell. The bias is added here rather than by XLA after the input
// projection, where it was one more pass over the [B, T, 4H] pre-activations (6-12 % of a layer
// at batch 4-16); the two additions round as they did there. XLA's dot packs the [H, 4H] weight
// on every step (it cannot know the weight is the same each step), so a step moves the weight
// about three times; here it is packed once by the caller (`w` below: blocks of L units, L the
// width of one vector register, each two pairs of gates, contraction-major) and every step reads
// it once per tile of rows, whole cache lines at a time, applying the cell as soon as a block's
// four gates are summed.
// The blocks of a step are shared between the calling thread and one task on XLA's intra-op
// pool, half each, and either takes what the other has not claimed, so a step never waits on a
// thread that has not started: the caller alone can finish every block.
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

// One step, batch-major: row b of each array starts `b * <its stride>` floats after its pointer.
struct Step {
  int64_t batch, hidden;  // hidden: padded to a multiple of 16
  const float* w;         // [H / L, 2, H, 2, L]: blocks of L units (L: the kernel's lanes),
                          // each two pairs of gates (i, f and g, o), contraction-major
  const float* gx;        // this step's input gate pre-activations, [4, H] per row
  const float* bias;      // [4, H]: b_ih + b_hh
  const float* h_prev;    // [H] per row
  const float* c_prev;    // [H] per row
  float* h;               // [H] per row
  float* c;               // [H] per row
  float* gates;           // [4, H] per row, or null: the summed pre-activations, for the gradient
  // Row strides: gx and gates; h_prev; c_prev; h; c.
  int64_t gates_stride, h_prev_stride, c_prev_stride, h_stride, c_stride;
};

// Rows [b0, b0 + rows) of one block of L units: the four gates' sums, `G` gates (2 or 4) per
// pass over the block's weights, the sums of earlier passes kept until the last is done, then
// the cell. A tile's rows x G accumulators, its G weight vectors and a broadcast should fit the
// registers, and rows x G should be at least 8: a fused multiply-add takes 4 cycles and two
// issue per cycle, so fewer independent sums leave the FMA units idle.
template <int L, int rows, int G>
INLINE void block_rows(const Step& s, int64_t block, int64_t b0) {
  typedef typename Lanes<L>::Vec V;
  typedef typename Lanes<L>::IVec IV;
  static_assert(G == 2 || G == 4, "a pass sums one pair of gates or both");
  const int64_t H = s.hidden;
  const float* w = s.w + block * 2 * H * 2 * L;  // [pair, k, gate in pair, L]
  V sums[kGates][rows];
  for (int pass = 0; pass < kGates / G; ++pass) {
    V acc[G][rows];
    for (int g = 0; g < G; ++g)
      for (int r = 0; r < rows; ++r) acc[g][r] = V{};
    for (int64_t k = 0; k < H; ++k) {
      V wk[G];
      for (int g = 0; g < G; ++g) {
        const int gate = pass * G + g;
        wk[g] = load<V>(w + ((gate / 2) * H + k) * 2 * L + (gate % 2) * L);
      }
#if defined(__x86_64__)
      // Keep the weight vectors in registers, as many as fit beside the accumulators and the
      // broadcast (16 registers below AVX-512, 32 with it). Left alone, GCC folds their loads
      // into every row's multiply-add, one load per FMA, more than the load ports serve (11 %
      // at 3 rows x 4 gates).
      constexpr int registers = L == 16 ? 32 : 16;
      constexpr int pinned = std::min(G, registers - rows * G - 1);
      for (int g = 0; g < pinned; ++g) __asm__("" : "+x"(wk[g]));
#endif
      for (int r = 0; r < rows; ++r) {
        const V hk = splat<V>(s.h_prev[(b0 + r) * s.h_prev_stride + k]);
        for (int g = 0; g < G; ++g) acc[g][r] += wk[g] * hk;
      }
    }
    for (int g = 0; g < G; ++g)
      for (int r = 0; r < rows; ++r) sums[pass * G + g][r] = acc[g][r];
  }
  const int64_t u = block * L;
  for (int r = 0; r < rows; ++r) {
    const int64_t b = b0 + r;
    V pre[kGates];
    for (int g = 0; g < kGates; ++g) {
      const int64_t at = g * H + u;
      pre[g] = (load<V>(s.gx + b * s.gates_stride + at) + load<V>(s.bias + at)) + sums[g][r];
      if (s.gates) store(s.gates + b * s.gates_stride + at, pre[g]);
    }
    const V c_prev = load<V>(s.c_prev + b * s.c_prev_stride + u);
    const V c = vsigmoid<V, IV>(pre[1]) * c_prev + vsigmoid<V, IV>(pre[0]) * vtanh<V, IV>(pre[2]);
    store(s.c + b * s.c_stride + u, c);
    store(s.h + b * s.h_stride + u, vsigmoid<V, IV>(pre[3]) * vtanh<V, IV>(c));
  }
}

// One tile of `rows` rows, 1 <= rows <= max_rows, as the instance compiled for that many: up to
// 3 rows, all four gates in one pass (3 rows x 2 gates would be only 6 independent sums), from 4
// rows, a pair of gates per pass.
template <int L, int max_rows>
INLINE void tile(const Step& s, int64_t block, int64_t b0, int64_t rows) {
  if constexpr (max_rows > 0) {
    if (rows == max_rows)
      block_rows<L, max_rows, (max_rows <= 3 ? 4 : 2)>(s, block, b0);
    else
      tile<L, max_rows - 1>(s, block, b0, rows);
  }
}

// Every row of one block, in as few tiles of at most `max_rows` as there can be, their sizes as
// even as they can be (16 rows in tiles of 6: 6 + 5 + 5): every tile is one pass over the
// block's weights, and a small tile does little work for its pass.
template <int L, int max_rows>
INLINE void run_block(const Step& s, int64_t block) {
  const int64_t tiles = (s.batch + max_rows - 1) / max_rows;
  for (int64_t i = 0, b = 0; i < tiles; ++i) {
    const int64_t rows = s.batch / tiles + (i < s.batch % tiles);
    tile<L, max_rows>(s, block, b, rows);
    b += rows;
  }
}

typedef void (*BlockFn)(const Step&, int64_t);

// One entry point per instruction set, each with the block width and largest row tile that fit
// its registers (measured: benchmarks/RESULTS.md); the extension offers those the running CPU
// has. All sum in the same order, and the two with FMA give the same bits.
#if defined(__x86_64__)
// 32 registers: tiles of up to 8 rows (16 accumulators), so batch 8 is one pass, 16 two.
struct Avx512 {
  static constexpr int lanes = 16;
  __attribute__((target("avx512f,avx2,fma"))) static void run_block(const Step& s, int64_t block) {
    ::run_block<lanes, 8>(s, block);
  }
};

// 16 registers: 6 rows x 2 gates of accumulators, 2 weight vectors and a broadcast.
struct Avx2 {
  static constexpr int lanes = 8;
  __attribute__((target("avx2,fma"))) static void run_block(const Step& s, int64_t block) {
    ::run_block<lanes, 6>(s, block);
  }
};
#endif

// Tiles of 2 rows x 4 gates: under SSE2 (no FMA: a product needs a register and an addition of
// its own) tiles of 4 rows x 2 gates ran 9-17 % slower at 1024 units.
struct Generic {
  static constexpr int lanes = 4;
  static void run_block(const Step& s, int64_t block) { ::run_block<lanes, 2>(s, block); }
};

// A counter alone on its cache line, so that the two threads' counters do not share one.
struct alignas(64) Counter {
  std::atomic<int64_t> value{0};
};

// The blocks of a step are split in two halves, one per thread (0: the caller, 1: its helper).
// Each thread claims its own half's blocks from its own counter, a cache line no other thread
// touches, and then takes what is left of the other half, so the caller can still finish a step
// alone. A shared counter for every block moved its cache line between the cores once per block
// (tens of them per step); this way each thread works on the same blocks step after step, keeps
// its counter's cache line, and reports its blocks once per step (4-10 % on the recurrence).
struct StepSync {
  Counter next[2];  // next block to claim in each half, counted from the half's start
  Counter done;     // blocks finished
};

// What the calling thread and its helper task share. The helper holds it by shared_ptr, so it
// stays valid if the task only starts after the call has returned (it then finds no work).
struct Shared {
  explicit Shared(int64_t steps) : sync(steps) {}
  std::vector<StepSync> sync;
  std::atomic<int64_t> published{-1};
  std::atomic<bool> finished{false};
  std::vector<Step> steps;
  std::vector<float> cells;  // two steps' cell states, alternating, when only the last is returned
  int64_t blocks = 0;
  BlockFn run_block = nullptr;
};

// Runs blocks of step t until none is left to claim: thread `me`'s own half first, then the other.
void work_on(Shared& shared, int64_t t, int me) {
  StepSync& sync = shared.sync[t];
  const int64_t half = (shared.blocks + 1) / 2;
  int64_t finished = 0;
  for (const int owner : {me, 1 - me}) {
    const int64_t start = owner == 0 ? 0 : half;
    const int64_t count = owner == 0 ? half : shared.blocks - half;
    for (;;) {
      const int64_t i = sync.next[owner].value.fetch_add(1, std::memory_order_relaxed);
      if (i >= count) break;
      shared.run_block(shared.steps[t], start + i);
      ++finished;
    }
  }
  if (finished) sync.done.value.fetch_add(finished, std::memory_order_release);
}

void helper(const std::shared_ptr<Shared>& shared, std::thread::id caller) {
  // A pool that cannot take the task runs it at once in the caller, before any step is
  // published: waiting there would never end, and the caller does every block itself anyway.
  if (std::this_thread::get_id() == caller) return;
  int64_t t = 0;
  const int64_t last = static_cast<int64_t>(shared->steps.size()) - 1;
  while (t <= last) {
    wait_until([&] {
      return shared->finished.load(std::memory_order_acquire) ||
             shared->published.load(std::memory_order_acquire) >= t;
    });
    if (shared->finished.load(std::memory_order_acquire)) return;
    t = shared->published.load(std::memory_order_acquire);  // a late start skips finished steps
    work_on(*shared, t, 1);
    ++t;
  }
}

// Inputs gx [B, T, 4, H], the packed weight, bias [4, H], h0 and c0 [B, H]. Outputs hs [B, T, H];
// with `training`, every step's cell state [B, T, H] and summed pre-activations [B, T, 4, H]
// (the backward pass needs both); without, the last cell state only, [B, 1, H], and no gates.
template <typename Kernel>
ffi::Error lstm_recurrence(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gx, ffi::Buffer<ffi::F32> w,
                           ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> h0,
                           ffi::Buffer<ffi::F32> c0, ffi::ResultBuffer<ffi::F32> hs,
                           ffi::ResultBuffer<ffi::F32> cs, ffi::ResultBuffer<ffi::F32> gates,
                           bool training) {
  const auto dims = gx.dimensions();  // [B, T, 4, H]
  if (dims.size() != 4 || dims[2] != kGates || dims[3] % Kernel::lanes != 0)
    return ffi::Error::InvalidArgument("lstm_recurrence: gx must be [B, T, 4, H], H % lanes == 0");
  const int64_t B = dims[0], T = dims[1], H = dims[3];
  const int64_t cs_steps = training ? T : 1;
  if (w.element_count() != static_cast<size_t>(kGates * H * H) ||
      bias.element_count() != static_cast<size_t>(kGates * H) ||
      h0.element_count() != static_cast<size_t>(B * H) ||
      c0.element_count() != static_cast<size_t>(B * H) ||
      cs->element_count() != static_cast<size_t>(B * cs_steps * H) ||
      gates->element_count() != static_cast<size_t>(training ? B * T * kGates * H : 0))
    return ffi::Error::InvalidArgument("lstm_recurrence: an operand or result of the wrong size");
  if (T == 0 || B == 0) return ffi::Error::Success();

  auto shared = std::make_shared<Shared>(T);
  shared->blocks = H / Kernel::lanes;
  shared->run_block = Kernel::run_block;
  shared->steps.resize(T);
  if (!training) shared->cells.resize(2 * B * H);
  for (int64_t t = 0; t < T; ++t) {
    Step& s = shared->steps[t];
    s.batch = B;
    s.hidden = H;
    s.w = w.typed_data();
    s.bias = bias.typed_data();
    s.gx = gx.typed_data() + t * kGates * H;
    s.gates = training ? gates->typed_data() + t * kGates * H : nullptr;
    s.gates_stride = T * kGates * H;
    s.h = hs->typed_data() + t * H;
    s.h_stride = T * H;
    s.h_prev = t == 0 ? h0.typed_data() : s.h - H;
    s.h_prev_stride = t == 0 ? H : T * H;
    if (training) {
      s.c = cs->typed_data() + t * H;
      s.c_stride = T * H;
    } else {  // steps alternate between two buffers; the last writes the result
      s.c = t == T - 1 ? cs->typed_data() : shared->cells.data() + (t % 2) * B * H;
      s.c_stride = H;
    }
    s.c_prev = t == 0 ? c0.typed_data() : shared->steps[t - 1].c;
    s.c_prev_stride = t == 0 ? H : shared->steps[t - 1].c_stride;
  }
  // One helper is worth its scheduling (a few microseconds) when a step has real work.
  if (pool.num_threads() > 1 && shared->blocks > 1 && B * H * H >= (1 << 18))
    pool.Schedule([shared, caller = std::this_thread::get_id()] { helper(shared, caller); });
  for (int64_t t = 0; t < T; ++t) {
    shared->published.store(t, std::memory_order_release);
    work_on(*shared, t, 0);
    wait_until([&] {
      return shared->sync[t].done.value.load(std::memory_order_acquire) == shared->blocks;
    });
  }
  shared->finished.store(true, std::memory_order_release);
  return ffi::Error::Success();
}

}  // namespace

// One handler per entry point; Python registers those the running CPU supports.
#define LSTM_HANDLER(name, Kernel)                                         \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, lstm_recurrence<Kernel>,               \
                                ffi::Ffi::Bind()                             \
                                    .Ctx<ffi::ThreadPool>()                  \
                                    .Arg<ffi::Buffer<ffi::F32>>()            \
                                    .Arg<ffi::Buffer<ffi::F32>>()            \
                                    .Arg<ffi::Buffer<ffi::F32>>()            \
                                    .Arg<ffi::Buffer<ffi::F32>>()            \
                                    .Arg<ffi::Buffer<ffi::F32>>()            \
                                    .Ret<ffi::Buffer<ffi::F32>>()            \
                                    .Ret<ffi::Buffer<ffi::F32>>()            \
                                    .Ret<ffi::Buffer<ffi::F32>>()            \
                                    .Attr<bool>("training"));

#if defined(__x86_64__)
LSTM_HANDLER(LstmRecurrenceAvx512, Avx512)
LSTM_HANDLER(LstmRecurrenceAvx2, Avx2)
#endif
LSTM_HANDLER(LstmRecurrenceGeneric, Generic)

static PyMethodDef no_methods[] = {{nullptr, nullptr, 0, nullptr}};
static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_lstm_cpu",
                                 "The LSTM recurrence as an XLA:CPU custom call.", -1, no_methods};

// `kernels`: {name: (FFI handler capsule, lanes)} for the entry points this CPU can run, fastest
// first; `lanes` is the width of the blocks its packed weight comes in.
PyMODINIT_FUNC PyInit__lstm_cpu(void) {
  struct Kernel {
    const char* name;
    XLA_FFI_Handler* handler;
    long lanes;
    bool supported;
  };
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool fma = __builtin_cpu_supports("fma");
  const Kernel all[] = {
      {"avx512", LstmRecurrenceAvx512, Avx512::lanes, __builtin_cpu_supports("avx512f") && fma},
      {"avx2", LstmRecurrenceAvx2, Avx2::lanes, __builtin_cpu_supports("avx2") && fma},
      {"generic", LstmRecurrenceGeneric, Generic::lanes, true},
  };
#else
  const Kernel all[] = {{"generic", LstmRecurrenceGeneric, Generic::lanes, true}};
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
    PyObject* capsule = PyCapsule_New(reinterpret_cast<void*>(kernel.handler), nullptr, nullptr);
    PyObject* entry = capsule ? Py_BuildValue("(Ol)", capsule, kernel.lanes) : nullptr;
    const bool added = entry != nullptr && PyDict_SetItemString(kernels, kernel.name, entry) == 0;
    Py_XDECREF(entry);
    Py_XDECREF(capsule);
    if (!added) {
      Py_DECREF(module);
      return nullptr;
    }
  }
  return module;
}
