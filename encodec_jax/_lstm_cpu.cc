// The LSTM recurrence as one XLA:CPU custom call (see encodec_jax/cpu_lstm.py for why).
//
// Each step t computes, for every batch row b and unit u,
//   gates[b, t, g, u] = (gx[b, t, g, u] + bias[g, u]) + sum_k h[b, t - 1, k] * w_hh[g, u, k]
// (g = i, f, g, o), then the cell. The bias is added here rather than by XLA after the input
// projection, where it was one more pass over the [B, T, 4H] pre-activations (6-12 % of a layer
// at batch 4-16); the two additions round as they did there. XLA's dot packs the [H, 4H] weight
// on every step (it cannot know the weight is the same each step), so a step moves the weight
// about three times; here it is packed once by the caller (`w` below, 16 units of all four gates
// per block, contraction-major) and every step reads it once, in 64-byte rows, applying the cell
// as soon as a block's four gates are summed.
// The 16-unit blocks of a step are shared between the calling thread and one task on XLA's
// intra-op pool, half each, and either takes what the other has not claimed, so a step never
// waits on a thread that has not started: the caller alone can finish every block.
//
// Every sum runs over k in ascending order, one fused multiply-add per term (the plain x86-64
// clone, for CPUs without FMA, rounds each product), whatever the batch size, the position of a
// row in the batch or the number of threads: a row's result depends on nothing else.

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

constexpr int kLanes = 16;  // units per block: one 64-byte vector of float32
constexpr int kGates = 4;
constexpr int kRows = 4;  // batch rows summed together: 16 accumulators, 4 weight rows, 1 broadcast

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

#define INLINE inline __attribute__((always_inline))

#if defined(__x86_64__)
#define MULTIVERSION __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#define CPU_RELAX() __builtin_ia32_pause()
#else
#define MULTIVERSION
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

INLINE Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

INLINE void store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

INLINE Vec splat(float x) { return Vec{} + x; }

// exp(x) for float32: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor series to r^7
// (truncation below 5e-9 relative), times 2^n through the exponent bits. Inputs are clamped to
// [-87, 88] so 2^n stays a normal float; NaN passes through the comparisons unchanged.
INLINE Vec vexp(Vec x) {
  x = x > splat(88.0f) ? splat(88.0f) : x;
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  // n = round(x / ln 2): adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
  const Vec n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  // ln 2 split so n * ln2_hi is exact for |n| < 2^8.
  const Vec r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  Vec p = splat(1.0f / 5040);
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

INLINE Vec vsigmoid(Vec x) { return 1.0f / (1.0f + vexp(-x)); }

// tanh(x) = 2 sigmoid(2x) - 1: saturates to +-1 exactly, absolute error a few 1e-8.
INLINE Vec vtanh(Vec x) { return 2.0f * vsigmoid(2.0f * x) - 1.0f; }

// One step, batch-major: row b of each array starts `b * <its stride>` floats after its pointer.
struct Step {
  int64_t batch, hidden;  // hidden: padded to a multiple of kLanes
  const float* w;         // [H / 16, 4, H, 16]
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

// Rows [b0, b0 + rows) of one 16-unit block: the four gates' sums, then the cell.
template <int rows>
INLINE void block_rows(const Step& s, int64_t block, int64_t b0) {
  const int64_t H = s.hidden;
  const float* w = s.w + block * kGates * H * kLanes;
  Vec acc[rows][kGates];
  for (int r = 0; r < rows; ++r)
    for (int g = 0; g < kGates; ++g) acc[r][g] = Vec{};
  for (int64_t k = 0; k < H; ++k) {
    Vec wk[kGates];
    for (int g = 0; g < kGates; ++g) wk[g] = load(w + (g * H + k) * kLanes);
    for (int r = 0; r < rows; ++r) {
      const Vec hk = splat(s.h_prev[(b0 + r) * s.h_prev_stride + k]);
      for (int g = 0; g < kGates; ++g) acc[r][g] += wk[g] * hk;
    }
  }
  const int64_t u = block * kLanes;
  for (int r = 0; r < rows; ++r) {
    const int64_t b = b0 + r;
    Vec pre[kGates];
    for (int g = 0; g < kGates; ++g) {
      pre[g] = (load(s.gx + b * s.gates_stride + g * H + u) + load(s.bias + g * H + u)) + acc[r][g];
      if (s.gates) store(s.gates + b * s.gates_stride + g * H + u, pre[g]);
    }
    const Vec c_prev = load(s.c_prev + b * s.c_prev_stride + u);
    const Vec c = vsigmoid(pre[1]) * c_prev + vsigmoid(pre[0]) * vtanh(pre[2]);
    store(s.c + b * s.c_stride + u, c);
    store(s.h + b * s.h_stride + u, vsigmoid(pre[3]) * vtanh(c));
  }
}

MULTIVERSION void run_block(const Step& s, int64_t block) {
  int64_t b = 0;
  for (; b + kRows <= s.batch; b += kRows) block_rows<kRows>(s, block, b);
  switch (s.batch - b) {
    case 3: block_rows<3>(s, block, b); break;
    case 2: block_rows<2>(s, block, b); break;
    case 1: block_rows<1>(s, block, b); break;
    default: break;
  }
}

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
      run_block(shared.steps[t], start + i);
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
ffi::Error lstm_recurrence(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gx, ffi::Buffer<ffi::F32> w,
                           ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> h0,
                           ffi::Buffer<ffi::F32> c0, ffi::ResultBuffer<ffi::F32> hs,
                           ffi::ResultBuffer<ffi::F32> cs, ffi::ResultBuffer<ffi::F32> gates,
                           bool training) {
  const auto dims = gx.dimensions();  // [B, T, 4, H]
  if (dims.size() != 4 || dims[2] != kGates || dims[3] % kLanes != 0)
    return ffi::Error::InvalidArgument("lstm_recurrence: gx must be [B, T, 4, H], H % 16 == 0");
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
  shared->blocks = H / kLanes;
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmRecurrence, lstm_recurrence,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("training"));

static PyMethodDef no_methods[] = {{nullptr, nullptr, 0, nullptr}};
static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_lstm_cpu",
                                 "The LSTM recurrence as an XLA:CPU custom call.", -1, no_methods};

PyMODINIT_FUNC PyInit__lstm_cpu(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  PyObject* capsule = PyCapsule_New(reinterpret_cast<void*>(LstmRecurrence), nullptr, nullptr);
  if (capsule == nullptr || PyModule_AddObject(module, "lstm_recurrence", capsule) < 0) {
    Py_XDECREF(capsule);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
