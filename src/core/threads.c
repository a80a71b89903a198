/* A parallel-for over a per-context pool of worker threads. Workers are
 * created on first use and kept until the context is freed, so a call costs a
 * wake-up, not a thread creation per worker (which dominated short kernels on
 * machines with many cores). Tasks are claimed with an atomic counter. */
#include "core/core.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

enum { MAX_THREADS = 256 };

struct fq_pool {
    int nworkers;                 /* threads besides the caller */
    pthread_t th[MAX_THREADS];
    pthread_mutex_t mu;
    pthread_cond_t wake, done;
    uint64_t generation;          /* bumped for every job */
    int pending;                  /* workers still inside the current job */
    int stop;
    pthread_mutex_t busy;         /* one job at a time; a second caller runs serially */
    /* the current job */
    void (*fn)(void *, int64_t);
    void *arg;
    int64_t n;
    _Atomic int64_t next;
};

static _Thread_local int t_in_task; /* a task that calls parallel_for runs it serially */

static void run_tasks(struct fq_pool *p) {
    t_in_task = 1;
    for (int64_t i; (i = atomic_fetch_add(&p->next, 1)) < p->n;) p->fn(p->arg, i);
    t_in_task = 0;
}

static void *worker(void *arg) {
    struct fq_pool *p = arg;
    uint64_t seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (p->generation == seen && !p->stop) pthread_cond_wait(&p->wake, &p->mu);
        if (p->stop) break;
        seen = p->generation;
        pthread_mutex_unlock(&p->mu);
        run_tasks(p);
        pthread_mutex_lock(&p->mu);
        if (--p->pending == 0) pthread_cond_signal(&p->done);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

void fq_pool_free(struct fq_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    for (int t = 0; t < p->nworkers; t++) pthread_join(p->th[t], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_mutex_destroy(&p->busy);
    pthread_cond_destroy(&p->wake);
    pthread_cond_destroy(&p->done);
    free(p);
}

/* A pool of nworkers threads, or NULL if none could be made (then work runs serially). */
static struct fq_pool *pool_create(int nworkers) {
    struct fq_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    pthread_mutex_init(&p->mu, NULL);
    pthread_mutex_init(&p->busy, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->done, NULL);
    for (int t = 0; t < nworkers; t++) {
        if (pthread_create(&p->th[t], NULL, worker, p) != 0) break;
        p->nworkers++;
    }
    return p;
}

void fq_parallel_for(fq_ctx *ctx, int64_t n, void (*fn)(void *arg, int64_t i), void *arg) {
    int nt = ctx && ctx->nthreads > 0 ? ctx->nthreads : 1;
    if (nt > MAX_THREADS) nt = MAX_THREADS;
    if (n <= 1 || nt == 1 || !ctx || t_in_task) {
        for (int64_t i = 0; i < n; i++) fn(arg, i);
        return;
    }
    /* The pool is sized by ctx->nthreads; a changed setting gets a new pool. */
    if (ctx->pool && ctx->pool->nworkers != nt - 1) {
        fq_pool_free(ctx->pool);
        ctx->pool = NULL;
    }
    if (!ctx->pool) ctx->pool = pool_create(nt - 1);
    struct fq_pool *p = ctx->pool;
    if (!p || p->nworkers == 0 || pthread_mutex_trylock(&p->busy) != 0) {
        for (int64_t i = 0; i < n; i++) fn(arg, i);
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->arg = arg;
    p->n = n;
    atomic_store(&p->next, 0);
    p->pending = p->nworkers;
    p->generation++;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    run_tasks(p); /* the caller works too */
    pthread_mutex_lock(&p->mu);
    while (p->pending > 0) pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
    pthread_mutex_unlock(&p->busy);
}
