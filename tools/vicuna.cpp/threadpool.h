// threadpool.h: a fixed set of std::thread workers that help the caller run one function.
//
// pool_run(fn, ctx) runs fn(ctx, ith, nth) on the calling thread (ith 0) and on every worker
// that joins in time, and returns when all of those are done. fn must split its work
// dynamically (an atomic counter of chunks, see matmul() in forward.h), so that the caller
// alone can finish everything: a worker that is descheduled (other processes on the machine)
// never holds up a step, it just does not join that job. A decode step calls pool_run ~150
// times, so a dispatch must cost microseconds: idle workers spin for a couple of milliseconds
// before they sleep on a condition variable (an idle chat session does not burn CPU).
//
// The job word packs (generation << 32) | (closed << 31) | active: a worker joins the current
// generation by incrementing `active` while the job is open; the caller closes the job when its
// own fn returns (all chunks are taken by then) and waits for `active` to drain.
#pragma once

#include <sched.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "common.h"

typedef void (*PoolFn)(void* ctx, int ith, int nth);

struct ThreadPool {
    int n_threads = 1;  // including the caller
    std::vector<std::thread> workers;
    std::atomic<uint64_t> job{0};  // generation:32 | closed:1 | active:31
    std::atomic<bool> quit{false};
    PoolFn fn = nullptr;
    void* ctx = nullptr;
    std::mutex mu;
    std::condition_variable cv;
    ~ThreadPool();
};

static const uint64_t POOL_CLOSED = 1ull << 31;
static const uint64_t POOL_ACTIVE_MASK = POOL_CLOSED - 1;

static inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

// Spin-wait step: pause for a while, then yield so a thread we wait for can get the core.
static inline void spin_wait(int* spins) {
    if (++*spins < 2000) cpu_relax();
    else sched_yield();
}

static void pool_worker(ThreadPool* p, int ith) {
    uint64_t seen = 0;  // last generation this worker looked at
    for (;;) {
        uint64_t s;
        double idle_since = 0.0;
        int spins = 0;
        while (((s = p->job.load(std::memory_order_acquire)) >> 32) == seen) {
            if (p->quit.load(std::memory_order_acquire)) return;
            spin_wait(&spins);
            if (spins % 1024 == 0) {
                double now = time_s();
                if (idle_since == 0.0) idle_since = now;
                if (now - idle_since > 2e-3) {  // idle for a while: sleep until the next job
                    std::unique_lock<std::mutex> lk(p->mu);
                    p->cv.wait(lk, [&] { return (p->job.load() >> 32) != seen || p->quit.load(); });
                    idle_since = 0.0;
                    spins = 0;
                }
            }
        }
        seen = s >> 32;
        // join unless the caller already closed this job
        bool joined = false;
        while (!(s & POOL_CLOSED) && (s >> 32) == seen) {
            if (p->job.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) {
                joined = true;
                break;
            }
        }
        if (!joined) continue;
        p->fn(p->ctx, ith, p->n_threads);
        p->job.fetch_sub(1, std::memory_order_acq_rel);
    }
}

static void pool_init(ThreadPool* p, int n_threads) {
    p->n_threads = std::max(1, n_threads);
    for (int i = 1; i < p->n_threads; i++) p->workers.emplace_back(pool_worker, p, i);
}

static void pool_free(ThreadPool* p) {  // safe to call twice
    {
        std::lock_guard<std::mutex> lk(p->mu);
        p->quit.store(true);
    }
    p->cv.notify_all();
    for (std::thread& t : p->workers) t.join();
    p->workers.clear();
    p->quit.store(false);
}

ThreadPool::~ThreadPool() { pool_free(this); }

static void pool_run(ThreadPool* p, PoolFn fn, void* ctx) {
    if (p->workers.empty()) {
        fn(ctx, 0, 1);
        return;
    }
    p->fn = fn;
    p->ctx = ctx;
    {
        std::lock_guard<std::mutex> lk(p->mu);  // pairs with the predicate check of a sleeping worker
        uint64_t gen = (p->job.load(std::memory_order_relaxed) >> 32) + 1;
        p->job.store(gen << 32, std::memory_order_release);  // open, nobody active
    }
    p->cv.notify_all();
    fn(ctx, 0, p->n_threads);
    uint64_t s = p->job.fetch_or(POOL_CLOSED, std::memory_order_acq_rel);
    int spins = 0;
    while ((s & POOL_ACTIVE_MASK) != 0) {
        spin_wait(&spins);
        s = p->job.load(std::memory_order_acquire);
    }
}
