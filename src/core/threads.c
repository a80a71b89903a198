/* A minimal parallel-for over pthreads: tasks are claimed with an atomic counter. */
#include "core/core.h"

#include <pthread.h>
#include <stdatomic.h>

typedef struct {
    void (*fn)(void *, int64_t);
    void *arg;
    int64_t n;
    _Atomic int64_t next;
} pf_job;

static void *pf_worker(void *p) {
    pf_job *j = p;
    for (int64_t i; (i = atomic_fetch_add(&j->next, 1)) < j->n;) j->fn(j->arg, i);
    return NULL;
}

void fq_parallel_for(fq_ctx *ctx, int64_t n, void (*fn)(void *arg, int64_t i), void *arg) {
    enum { MAX_THREADS = 256 };
    int nt = ctx && ctx->nthreads > 0 ? ctx->nthreads : 1;
    if (nt > MAX_THREADS) nt = MAX_THREADS;
    if (nt > n) nt = (int)n;
    pf_job j = {fn, arg, n, 0};
    pthread_t th[MAX_THREADS];
    int started = 0;
    for (int t = 1; t < nt; t++)
        if (pthread_create(&th[started], NULL, pf_worker, &j) == 0) started++;
    pf_worker(&j); /* the caller works too; if no thread started it does everything */
    for (int t = 0; t < started; t++) pthread_join(th[t], NULL);
}
