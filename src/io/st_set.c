/* A checkpoint as a set of safetensors files: one file, an index of shards, or a folder. */
#include "io/atomic_file.h"
#include "io/json_util.h"
#include "io/safetensors.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

struct fq_st_set {
    fq_st_file **files;
    int nfiles;
    const fq_st_tensor **all;     /* shard by shard */
    const fq_st_tensor **by_name; /* sorted for find */
    int64_t n;
};

void fq_st_set_close(fq_st_set *s) {
    if (!s) return;
    for (int i = 0; i < s->nfiles; i++) fq_st_close(s->files[i]);
    free(s->files);
    free(s->all);
    free(s->by_name);
    free(s);
}

int64_t fq_st_set_count(const fq_st_set *s) { return s->n; }
const fq_st_tensor *fq_st_set_get(const fq_st_set *s, int64_t i) {
    return i >= 0 && i < s->n ? s->all[i] : NULL;
}
int fq_st_set_nfiles(const fq_st_set *s) { return s->nfiles; }
const fq_st_file *fq_st_set_file(const fq_st_set *s, int i) {
    return i >= 0 && i < s->nfiles ? s->files[i] : NULL;
}

static int cmp_name(const void *a, const void *b) {
    return strcmp((*(const fq_st_tensor *const *)a)->name, (*(const fq_st_tensor *const *)b)->name);
}

const fq_st_tensor *fq_st_set_find(const fq_st_set *s, const char *name) {
    fq_st_tensor key = {.name = name};
    const fq_st_tensor *kp = &key;
    const fq_st_tensor **hit = bsearch(&kp, s->by_name, (size_t)s->n, sizeof *s->by_name, cmp_name);
    return hit ? *hit : NULL;
}

static int ends_with(const char *s, const char *suf) {
    size_t a = strlen(s), b = strlen(suf);
    return a >= b && strcmp(s + a - b, suf) == 0;
}

static int is_file(const char *p) {
    struct stat st;
    return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

/* "<dir>/<name>" in a new string (caller frees), NULL on OOM. */
static char *join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, name);
    return p;
}

/* Lists every tensor of every shard; a name in two shards is an error. */
static fq_status index_tensors(fq_ctx *ctx, fq_st_set *s, const char *what) {
    int64_t n = 0;
    for (int i = 0; i < s->nfiles; i++) n += fq_st_count(s->files[i]);
    s->all = malloc(((size_t)n + 1) * sizeof *s->all);
    s->by_name = malloc(((size_t)n + 1) * sizeof *s->by_name);
    if (!s->all || !s->by_name) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    for (int i = 0; i < s->nfiles; i++)
        for (int64_t j = 0; j < fq_st_count(s->files[i]); j++) s->all[s->n++] = fq_st_get(s->files[i], j);
    memcpy(s->by_name, s->all, (size_t)n * sizeof *s->all);
    qsort(s->by_name, (size_t)n, sizeof *s->by_name, cmp_name);
    for (int64_t i = 1; i < n; i++)
        if (strcmp(s->by_name[i - 1]->name, s->by_name[i]->name) == 0)
            return fq_err(ctx, FQ_ERR_FORMAT, "%s: tensor '%s' is in both '%s' and '%s'", what,
                          s->by_name[i]->name, fq_st_path(s->by_name[i - 1]->file),
                          fq_st_path(s->by_name[i]->file));
    return FQ_OK;
}

static fq_status add_file(fq_ctx *ctx, fq_st_set *s, const char *path) {
    fq_st_file **v = realloc(s->files, (size_t)(s->nfiles + 1) * sizeof *v);
    if (!v) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    s->files = v;
    FQ_TRY(fq_st_open(ctx, path, &s->files[s->nfiles]));
    s->nfiles++;
    return FQ_OK;
}

static int shard_name_ok(const char *f) {
    return *f && !strchr(f, '/') && strcmp(f, ".") != 0 && strcmp(f, "..") != 0;
}

/* Opens the shards of an index. Every mapped name must be in its shard. */
static fq_status open_index(fq_ctx *ctx, fq_st_set *s, const char *index_path) {
    char *text;
    size_t len;
    FQ_TRY(fq_read_file(ctx, index_path, (size_t)FQ_ST_MAX_HEADER, &text, &len));
    cJSON *root = NULL;
    fq_status st = fq_json_parse(ctx, index_path, text, len, &root);
    free(text);
    if (st != FQ_OK) return st;
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    if (!cJSON_IsObject(root) || !cJSON_IsObject(map))
        st = fq_err(ctx, FQ_ERR_FORMAT, "%s: no \"weight_map\" object", index_path);
    char *dir = fq_strdup(index_path);
    if (st == FQ_OK && !dir) st = fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    if (dir) {
        char *slash = strrchr(dir, '/');
        if (slash) *slash = '\0';
        else strcpy(dir, ".");
    }
    /* Shards in order of first mention; each opened once. */
    const char **names = NULL;
    if (st == FQ_OK && !(names = calloc((size_t)cJSON_GetArraySize(map) + 1, sizeof *names)))
        st = fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    int nnames = 0;
    for (const cJSON *e = st == FQ_OK ? map->child : NULL; e && st == FQ_OK; e = e->next) {
        if (!cJSON_IsString(e) || !shard_name_ok(e->valuestring)) {
            st = fq_err(ctx, FQ_ERR_FORMAT, "%s: tensor '%s': shard is not a plain file name", index_path,
                        e->string);
            break;
        }
        int k = 0;
        while (k < nnames && strcmp(names[k], e->valuestring) != 0) k++;
        if (k < nnames) continue;
        names[nnames++] = e->valuestring;
        char *p = join(dir, e->valuestring);
        if (!p) st = fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
        else if (!is_file(p))
            st = fq_err(ctx, FQ_ERR_IO, "%s: shard '%s' (holding tensor '%s') does not exist", index_path,
                        e->valuestring, e->string);
        else if ((st = add_file(ctx, s, p)) != FQ_OK)
            fq_err_prefix(ctx, st, "%s: shard '%s'", index_path, e->valuestring);
        free(p);
    }
    for (const cJSON *e = st == FQ_OK ? map->child : NULL; e && st == FQ_OK; e = e->next) {
        int k = 0;
        while (strcmp(names[k], e->valuestring) != 0) k++;
        if (!fq_st_find(s->files[k], e->string))
            st = fq_err(ctx, FQ_ERR_FORMAT, "%s: tensor '%s' is mapped to shard '%s', which does not hold it",
                        index_path, e->string, e->valuestring);
    }
    free(names);
    free(dir);
    cJSON_Delete(root);
    return st;
}

/* Picks the checkpoint file of a folder (see safetensors.h). *out: caller frees. */
static fq_status pick_in_folder(fq_ctx *ctx, const char *dir, char **out) {
    static const char *const preferred[] = {
        "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
        "model.safetensors", "model.safetensors.index.json"};
    for (size_t i = 0; i < sizeof preferred / sizeof preferred[0]; i++) {
        char *p = join(dir, preferred[i]);
        if (!p) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
        if (is_file(p)) { *out = p; return FQ_OK; }
        free(p);
    }
    DIR *d = opendir(dir);
    if (!d) return fq_err(ctx, FQ_ERR_IO, "%s: cannot list folder: %s", dir, strerror(errno));
    char *idx = NULL, *one = NULL;
    int nidx = 0, nst = 0;
    for (struct dirent *e; (e = readdir(d));) {
        if (ends_with(e->d_name, ".safetensors.index.json")) {
            if (!nidx++) idx = fq_strdup(e->d_name);
        } else if (ends_with(e->d_name, ".safetensors")) {
            if (!nst++) one = fq_strdup(e->d_name);
        }
    }
    closedir(d);
    fq_status s = FQ_OK;
    const char *pick = NULL;
    if (nidx > 1) s = fq_err(ctx, FQ_ERR_FORMAT, "%s: %d *.safetensors.index.json files; name one", dir, nidx);
    else if (nidx == 1) pick = idx;
    else if (nst > 1) s = fq_err(ctx, FQ_ERR_FORMAT, "%s: %d .safetensors files and no index; name one", dir, nst);
    else if (nst == 1) pick = one;
    else s = fq_err(ctx, FQ_ERR_IO, "%s: no .safetensors file in the folder", dir);
    if (s == FQ_OK && (!pick || !(*out = join(dir, pick))))
        s = fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    free(idx);
    free(one);
    return s;
}

fq_status fq_st_set_open(fq_ctx *ctx, const char *path, fq_st_set **out) {
    fq_st_set *s = calloc(1, sizeof *s);
    if (!s) return fq_err(ctx, FQ_ERR_OUT_OF_MEMORY, "out of host memory");
    struct stat st;
    char *picked = NULL;
    fq_status r = FQ_OK;
    if (stat(path, &st) != 0) r = fq_err(ctx, FQ_ERR_IO, "%s: %s", path, strerror(errno));
    else if (S_ISDIR(st.st_mode)) r = pick_in_folder(ctx, path, &picked);
    const char *p = picked ? picked : path;
    if (r == FQ_OK) r = ends_with(p, ".index.json") ? open_index(ctx, s, p) : add_file(ctx, s, p);
    if (r == FQ_OK) r = index_tensors(ctx, s, p);
    free(picked);
    if (r != FQ_OK) {
        fq_st_set_close(s);
        return r;
    }
    *out = s;
    return FQ_OK;
}
