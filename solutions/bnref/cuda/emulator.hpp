// emulator.hpp: just enough of CUDA's execution model to run chapter 5's kernels on a CPU, for tests.
//
// bnref/cuda/emulator.py compiles a kernel file's exact source (the string CuPy
// hands to NVRTC) with a host C++ compiler and `-include` of this header, and
// launches its kernels through emu_launch. The model:
//   * blocks run one after another, in the order the launch asks for (forward,
//     reverse, or a seeded shuffle), so a result that depends on which block
//     finishes last shows up as a difference between orders;
//   * the threads of a block are fibers (ucontext) of one OS thread, switched only
//     at __syncthreads and at warp shuffles; between those points they run in a
//     chosen order, so a missing barrier shows up the same way;
//   * __shared__ is a static local: one copy, visible to the block running now,
//     filled with 0xFF bytes (NaN) before each block. g++ ignores the section attribute
//     that finds it for a static local of a template, which then starts at zero and is
//     never refilled: declare shared arrays in the kernel itself and pass them down;
//   * __syncthreads releases when every thread of the block that has not exited
//     waits there; a warp shuffle when every lane of the warp waits at a shuffle.
//     Anything else is reported as an error instead of hanging: threads waiting
//     at two different __syncthreads, some at a barrier while the rest of their
//     warp waits at a shuffle, a full-mask shuffle with lanes missing.
// Floating point is IEEE float on the host with FMA contraction off: the
// results are those of the reduction tree in plain float arithmetic, which is
// what bnref.cuda.mirror replays.
#pragma once

#include <ucontext.h>

#include <math.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <random>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Every __shared__ variable lands in one section, which each block starts by filling with 0xFF bytes (NaN as
// float), as a GPU's shared memory holds whatever the last block left: a read before a write is visible.
#define __shared__ static __attribute__((section("emu_shared")))
extern "C" char __start_emu_shared[], __stop_emu_shared[];
namespace emu {
__attribute__((used, section("emu_shared"))) static char shared_anchor;  // the section exists in every kernel file
}

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

namespace emu {

enum class Wait { running, barrier, shuffle, done };

// A store through __stcg that is not yet visible to the whole grid.
struct Store {
    void* address;
    unsigned char bytes[16];
    int size;
};

inline void publish(std::vector<Store>& stores) {
    for (const Store& s : stores) std::memcpy(s.address, s.bytes, (std::size_t)s.size);
    stores.clear();
}

struct Fiber {
    ucontext_t ctx;
    uint3 tid;
    Wait wait;
    std::uint32_t shfl_value;  // what this lane offers to, then receives from, a shuffle
    int shfl_src;              // the lane it reads
    const char* bar_file;      // where it waits at __syncthreads
    int bar_line;
    std::vector<char> stack;
    std::vector<Store> stores;  // its __stcg stores, visible to itself alone
};

struct Launch {
    void (*thunk)(void**);
    void** args;
    uint3 block_idx;
    dim3 block_dim, grid_dim;
    std::vector<Fiber> fibers;
    int current;
    ucontext_t scheduler;
    std::mt19937 rng;
    int order;  // 0 forward, 1 reverse, 2 shuffled
    std::string error;
    std::vector<Store> block_stores;  // __stcg stores the block's threads see (after a barrier), not the grid
    std::vector<Store> unpublished;   // stores of finished blocks never fenced: visible at the end of the launch
};

inline Launch* L = nullptr;

inline Fiber& self() { return L->fibers[L->current]; }

inline void fail(const std::string& what) {
    if (L->error.empty()) L->error = what;
}

inline void park(Wait why) {
    Fiber& f = self();
    f.wait = why;
    swapcontext(&f.ctx, &L->scheduler);
}

inline void fiber_main() {
    L->thunk(L->args);
    self().wait = Wait::done;  // returning resumes the scheduler (uc_link)
}

inline std::vector<int> order_of(int n) {
    std::vector<int> idx(n);
    for (int i = 0; i < n; ++i) idx[i] = L->order == 1 ? n - 1 - i : i;
    if (L->order == 2) std::shuffle(idx.begin(), idx.end(), L->rng);
    return idx;
}

// One round of shuffles: every warp whose live lanes all wait at a shuffle exchanges. Returns true if any did.
inline bool exchange_warps() {
    const int n = (int)L->fibers.size();
    bool progressed = false;
    for (int w0 = 0; w0 < n; w0 += 32) {
        const int w1 = std::min(n, w0 + 32);
        int waiting = 0, live = 0;
        for (int i = w0; i < w1; ++i) {
            live += L->fibers[i].wait != Wait::done;
            waiting += L->fibers[i].wait == Wait::shuffle;
        }
        if (waiting == 0 || waiting != live) continue;
        if (live != 32) {
            fail("__shfl_*_sync with the full mask in a warp of " + std::to_string(live) +
                 " live lanes (all 32 must take part)");
            return false;
        }
        std::uint32_t offered[32];
        for (int i = w0; i < w1; ++i) offered[i - w0] = L->fibers[i].shfl_value;
        for (int i = w0; i < w1; ++i) {
            Fiber& f = L->fibers[i];
            f.shfl_value = offered[f.shfl_src];
            f.wait = Wait::running;
        }
        progressed = true;
    }
    return progressed;
}

inline void run_block(std::size_t stack_bytes) {
    std::memset(__start_emu_shared, 0xFF, (std::size_t)(__stop_emu_shared - __start_emu_shared));
    const dim3 bd = L->block_dim;
    const int n = (int)(bd.x * bd.y * bd.z);
    L->fibers.resize(n);
    for (int i = 0; i < n; ++i) {
        Fiber& f = L->fibers[i];
        f.tid = uint3{(unsigned)i % bd.x, (unsigned)(i / bd.x) % bd.y, (unsigned)(i / (bd.x * bd.y))};
        f.wait = Wait::running;
        f.stores.clear();
        f.stack.resize(stack_bytes);
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = &L->scheduler;
        makecontext(&f.ctx, fiber_main, 0);
    }
    for (;;) {
        bool ran = false;
        for (int i : order_of(n)) {
            if (L->fibers[i].wait != Wait::running) continue;
            L->current = i;
            swapcontext(&L->scheduler, &L->fibers[i].ctx);
            ran = true;
            if (!L->error.empty()) return;
        }
        if (ran) continue;
        if (exchange_warps()) continue;
        if (!L->error.empty()) return;
        int live = 0, at_barrier = 0;
        for (const Fiber& f : L->fibers) {
            live += f.wait != Wait::done;
            at_barrier += f.wait == Wait::barrier;
        }
        if (live == 0) return;
        if (at_barrier == live) {
            const Fiber* first = nullptr;
            for (const Fiber& f : L->fibers) {
                if (f.wait != Wait::barrier) continue;
                if (first == nullptr) first = &f;
                if (f.bar_line != first->bar_line || std::strcmp(f.bar_file, first->bar_file) != 0) {
                    fail("divergent __syncthreads: threads of one block wait at " + std::string(first->bar_file) + ":" +
                         std::to_string(first->bar_line) + " and at " + f.bar_file + ":" + std::to_string(f.bar_line));
                    return;
                }
            }
            for (Fiber& f : L->fibers) {
                if (f.wait == Wait::barrier) f.wait = Wait::running;
                L->block_stores.insert(L->block_stores.end(), f.stores.begin(), f.stores.end());
                f.stores.clear();
            }
            continue;
        }
        fail("deadlock in block (" + std::to_string(L->block_idx.x) + ", " + std::to_string(L->block_idx.y) + ", " +
             std::to_string(L->block_idx.z) + "): " + std::to_string(at_barrier) + " of " + std::to_string(live) +
             " live threads wait at __syncthreads, the others at a warp shuffle (divergent barrier)");
        return;
    }
}

template <class T>
inline T shuffle(unsigned mask, T v, int src_lane) {
    static_assert(sizeof(T) == 4, "the emulator shuffles 32-bit values");
    if (mask != 0xffffffffu) fail("the emulator supports only the full mask in __shfl_*_sync");
    Fiber& f = self();
    std::memcpy(&f.shfl_value, &v, 4);
    f.shfl_src = src_lane;
    park(Wait::shuffle);
    T r;
    std::memcpy(&r, &self().shfl_value, 4);
    return r;
}

}  // namespace emu

#define threadIdx (::emu::self().tid)
#define blockIdx (::emu::L->block_idx)
#define blockDim (::emu::L->block_dim)
#define gridDim (::emu::L->grid_dim)

namespace emu {
inline void barrier(const char* file, int line) {
    self().bar_file = file;
    self().bar_line = line;
    park(Wait::barrier);
}
}  // namespace emu
#define __syncthreads() ::emu::barrier(__FILE__, __LINE__)
// Makes the thread's own __stcg stores, and those its block's threads made visible to it, visible to the grid.
inline void __threadfence() {
    emu::publish(emu::L->block_stores);
    emu::publish(emu::self().stores);
}

template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
    const int lane = (int)(((threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x) & 31u);
    return emu::shuffle(mask, v, lane + (int)delta < 32 ? lane + (int)delta : lane);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    const int lane = (int)(((threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x) & 31u);
    return emu::shuffle(mask, v, (lane ^ lane_mask) & 31);
}

template <class T>
inline T __ldg(const T* p) { return *p; }
template <class T>
inline void __stcg(T* p, T v) {
    static_assert(sizeof(T) <= 16, "the emulator buffers stores of at most 16 bytes");
    emu::Store s;
    s.address = p;
    s.size = (int)sizeof(T);
    std::memcpy(s.bytes, &v, sizeof(T));
    emu::self().stores.push_back(s);
}
// The latest of the thread's own buffered stores to p, else of its block's, else memory.
template <class T>
inline T __ldcg(const T* p) {
    for (const std::vector<emu::Store>* stores : {&emu::self().stores, &emu::L->block_stores}) {
        for (auto s = stores->rbegin(); s != stores->rend(); ++s) {
            if (s->address == p && s->size == (int)sizeof(T)) {
                T v;
                std::memcpy(&v, s->bytes, sizeof(T));
                return v;
            }
        }
    }
    return *p;
}
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) {
    const unsigned int old = *p;
    *p = old + v;
    return old;
}
inline float atomicAdd(float* p, float v) {
    const float old = *p;
    *p = old + v;
    return old;
}
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float a) { return 1.0f / std::sqrt(a); }
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, 4);
    return i;
}

// Launches thunk(args) on a grid; returns 0, or 1 with a message in err.
extern "C" int emu_launch(void (*thunk)(void**), void** args, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                          unsigned by, unsigned bz, int order, unsigned seed, char* err, int err_len) {
    emu::Launch launch;
    launch.thunk = thunk;
    launch.args = args;
    launch.grid_dim = dim3{gx, gy, gz};
    launch.block_dim = dim3{bx, by, bz};
    launch.rng.seed(seed);
    launch.order = order;
    emu::L = &launch;
    const int blocks = (int)(gx * gy * gz);
    for (int b : emu::order_of(blocks)) {
        launch.block_idx = uint3{(unsigned)b % gx, (unsigned)(b / gx) % gy, (unsigned)(b / (gx * gy))};
        emu::run_block(64 * 1024);
        for (emu::Fiber& f : launch.fibers) {
            launch.block_stores.insert(launch.block_stores.end(), f.stores.begin(), f.stores.end());
            f.stores.clear();
        }
        launch.unpublished.insert(launch.unpublished.end(), launch.block_stores.begin(), launch.block_stores.end());
        launch.block_stores.clear();
        if (!launch.error.empty()) break;
    }
    emu::publish(launch.unpublished);
    emu::L = nullptr;
    std::snprintf(err, err_len, "%s", launch.error.c_str());
    return launch.error.empty() ? 0 : 1;
}
