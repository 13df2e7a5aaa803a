/* kiln.tokenizer._native: the C core of Kiln's byte-level BPE tokenizer.
 *
 * Three jobs, each with a pure-Python reference in kiln/tokenizer/ that tests hold it equal to:
 *   1. pre-tokenization (GPT-2, GPT-2 with single digits, cl100k split patterns), hand-written as
 *      matchers over UTF-8 with the character classes of the `regex` package (_native_unicode.h);
 *      invalid UTF-8 bytes count as "other" characters, as surrogateescape'd text does in Python;
 *   2. WordCounter: parallel pre-tokenize-and-count over a byte buffer (pthreads, GIL released);
 *   3. merge_words: BPE training with incremental pair counts and an indexed max-heap;
 *   4. Encoder: merges applied by rank, a pre-token cache, special tokens, batch encoding on threads.
 */
#define _GNU_SOURCE  /* memmem */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_native_unicode.h"

enum { C_OTHER = 0, C_LETTER = 1, C_NUMBER = 2, C_SPACE = 3 };
enum { PAT_GPT2 = 0, PAT_GPT2_DIGITS = 1, PAT_CL100K = 2 };

/* ------------------------------------------------------------------ character classes */
static uint8_t bmp_class[0x10000];

static void init_classes(void) {
    for (int r = 0; r < KILN_UNI_RUNS; r++) {
        unsigned lo = kiln_uni_start[r];
        unsigned hi = r + 1 < KILN_UNI_RUNS ? kiln_uni_start[r + 1] : 0x110000;
        if (lo >= 0x10000) break;
        if (hi > 0x10000) hi = 0x10000;
        memset(bmp_class + lo, kiln_uni_class[r], hi - lo);
    }
}

static inline int class_of(uint32_t cp) {
    if (cp < 0x10000) return bmp_class[cp];
    int lo = 0, hi = KILN_UNI_RUNS - 1;
    while (lo < hi) { /* last run whose start <= cp */
        int mid = (lo + hi + 1) >> 1;
        if (kiln_uni_start[mid] <= cp) lo = mid; else hi = mid - 1;
    }
    return kiln_uni_class[lo];
}

/* Decode one character at s[i] (i < n): returns its length in bytes, sets *cls and *cp.
 * Strict UTF-8 (as Python's decoder): an invalid byte is one "other" character of length 1. */
static inline int decode_char(const uint8_t *s, size_t i, size_t n, int *cls, uint32_t *cp) {
    uint8_t c = s[i];
    if (c < 0x80) { *cp = c; *cls = bmp_class[c]; return 1; }
    uint32_t v; int len;
    if (c >= 0xC2 && c <= 0xDF) { len = 2; v = c & 0x1F; }
    else if (c >= 0xE0 && c <= 0xEF) { len = 3; v = c & 0x0F; }
    else if (c >= 0xF0 && c <= 0xF4) { len = 4; v = c & 0x07; }
    else goto invalid;
    if (i + len > n) goto invalid;
    {
        uint8_t c1 = s[i + 1];
        uint8_t lo = 0x80, hi = 0xBF;
        if (c == 0xE0) lo = 0xA0; else if (c == 0xED) hi = 0x9F;
        else if (c == 0xF0) lo = 0x90; else if (c == 0xF4) hi = 0x8F;
        if (c1 < lo || c1 > hi) goto invalid;
        v = (v << 6) | (c1 & 0x3F);
        for (int k = 2; k < len; k++) {
            uint8_t ck = s[i + k];
            if ((ck & 0xC0) != 0x80) goto invalid;
            v = (v << 6) | (ck & 0x3F);
        }
    }
    *cp = v; *cls = class_of(v); return len;
invalid:
    *cp = 0xDC00 + c; *cls = C_OTHER; return 1;
}

/* End of the run of characters of class `cls` starting at i. */
static inline size_t run_of(const uint8_t *s, size_t i, size_t n, int cls) {
    int c; uint32_t cp;
    while (i < n) {
        if (s[i] < 0x80) { if (bmp_class[s[i]] != cls) break; i++; continue; }
        int len = decode_char(s, i, n, &c, &cp);
        if (c != cls) break;
        i += len;
    }
    return i;
}

static inline int lower_ascii(int c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }

/* Length of a contraction at s[i] == '\'' (0 if none). GPT-2: case-sensitive; cl100k: not. */
static inline size_t contraction(const uint8_t *s, size_t i, size_t n, int icase) {
    if (i + 1 >= n) return 0;
    int a = icase ? lower_ascii(s[i + 1]) : s[i + 1];
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    if (i + 2 >= n) return 0;
    int b = icase ? lower_ascii(s[i + 2]) : s[i + 2];
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
    return 0;
}

/* \s+(?!\S) then \s+ from i (s[i] is whitespace): the whole run at the end of the text, else the run
 * less its last character when that leaves at least one, else the single character. */
static inline size_t space_run(const uint8_t *s, size_t i, size_t n) {
    size_t j = i, last = i; int c; uint32_t cp;
    while (j < n) {
        int len = decode_char(s, j, n, &c, &cp);
        if (c != C_SPACE) break;
        last = j; j += len;
    }
    if (j == n) return n;
    return last > i ? last : j;
}

/* End of the pre-token that starts at i < n. */
static size_t next_pretoken(const uint8_t *s, size_t i, size_t n, int pat) {
    int c0, c1; uint32_t cp0, cp1;
    int len0 = decode_char(s, i, n, &c0, &cp0);
    if (pat != PAT_CL100K) {
        if (cp0 == '\'') { size_t k = contraction(s, i, n, 0); if (k) return i + k; }
        if (cp0 == ' ' && i + 1 < n) {
            decode_char(s, i + 1, n, &c1, &cp1);
            if (c1 == C_LETTER || c1 == C_OTHER) return run_of(s, i + 1, n, c1);
            if (c1 == C_NUMBER) {
                if (pat == PAT_GPT2) return run_of(s, i + 1, n, C_NUMBER);
                /* digits: "\p{N}" takes no space; the space stands alone (below) */
            }
        }
        if (c0 == C_LETTER || c0 == C_OTHER) return run_of(s, i + len0, n, c0);
        if (c0 == C_NUMBER) return pat == PAT_GPT2 ? run_of(s, i + len0, n, C_NUMBER) : i + len0;
        return space_run(s, i, n);
    }
    /* cl100k: '(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*
     *         |\s*[\r\n]|\s+(?!\S)|\s+ */
    if (cp0 == '\'') { size_t k = contraction(s, i, n, 1); if (k) return i + k; }
    if (c0 == C_LETTER) return run_of(s, i + len0, n, C_LETTER);
    if (c0 != C_NUMBER && cp0 != '\r' && cp0 != '\n' && i + len0 < n) {
        decode_char(s, i + len0, n, &c1, &cp1);
        if (c1 == C_LETTER) return run_of(s, i + len0, n, C_LETTER);
    }
    if (c0 == C_NUMBER) {
        size_t j = i + len0; int k = 1, c; uint32_t cp;
        while (k < 3 && j < n) { int l = decode_char(s, j, n, &c, &cp); if (c != C_NUMBER) break; j += l; k++; }
        return j;
    }
    size_t j = 0;
    if (c0 == C_OTHER) j = run_of(s, i + len0, n, C_OTHER);
    else if (cp0 == ' ' && i + 1 < n) {
        decode_char(s, i + 1, n, &c1, &cp1);
        if (c1 == C_OTHER) j = run_of(s, i + 1, n, C_OTHER);
    }
    if (j) { while (j < n && (s[j] == '\r' || s[j] == '\n')) j++; return j; }
    /* c0 is whitespace. \s*[\r\n]: up to the last \r or \n of the whitespace run. */
    size_t k = i, end_nl = 0; int c; uint32_t cp;
    while (k < n) {
        int l = decode_char(s, k, n, &c, &cp);
        if (c != C_SPACE) break;
        k += l;
        if (cp == '\r' || cp == '\n') end_nl = k;
    }
    if (end_nl) return end_nl;
    return space_run(s, i, n);
}

/* ------------------------------------------------------------------ special tokens */
typedef struct { const uint8_t *s; size_t len; int id; } Special;

/* Leftmost special token at or after pos (longest on ties); returns its index or -1. */
static int find_special(const uint8_t *s, size_t pos, size_t n, const Special *sp, int nsp, size_t *at) {
    int best = -1; size_t best_at = n;
    for (int k = 0; k < nsp; k++) {
        if (sp[k].len == 0 || pos + sp[k].len > n) continue;
        size_t lim = best_at < n && best_at + sp[k].len < n ? best_at + sp[k].len : n;
        const uint8_t *hit = memmem(s + pos, lim - pos, sp[k].s, sp[k].len);
        if (!hit) continue;
        size_t h = (size_t)(hit - s);
        if (h < best_at || (h == best_at && sp[k].len > sp[best].len)) { best = k; best_at = h; }
    }
    *at = best_at;
    return best;
}

/* ------------------------------------------------------------------ hashing */
static inline uint64_t hash_bytes(const uint8_t *p, size_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ (n * 0xff51afd7ed558ccdULL);
    while (n >= 8) { uint64_t v; memcpy(&v, p, 8); h = (h ^ v) * 0x100000001B3ULL; h ^= h >> 29; p += 8; n -= 8; }
    uint64_t v = 0; memcpy(&v, p, n); h = (h ^ v) * 0x100000001B3ULL;
    h ^= h >> 32; h *= 0xd6e8feb86659fd93ULL; h ^= h >> 32;
    return h;
}
static inline uint64_t hash_u64(uint64_t x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33;
    return x;
}

/* A string -> int64 map with keys copied into an arena (open addressing, linear probing). */
typedef struct { uint64_t hash; size_t off; uint32_t len; int64_t val; } SEntry;
typedef struct { SEntry *e; size_t cap, size; uint8_t *arena; size_t alen, acap; } SMap;

static int smap_init(SMap *m, size_t cap) {
    m->cap = cap; m->size = 0; m->e = calloc(cap, sizeof(SEntry));
    m->acap = 1 << 20; m->alen = 0; m->arena = malloc(m->acap);
    return m->e && m->arena ? 0 : -1;
}
static void smap_free(SMap *m) { free(m->e); free(m->arena); m->e = NULL; m->arena = NULL; }
static void smap_clear(SMap *m) { memset(m->e, 0, m->cap * sizeof(SEntry)); m->size = 0; m->alen = 0; }

static int smap_grow(SMap *m) {
    size_t nc = m->cap * 2; SEntry *ne = calloc(nc, sizeof(SEntry));
    if (!ne) return -1;
    for (size_t i = 0; i < m->cap; i++) {
        if (!m->e[i].len && !m->e[i].hash) continue;
        size_t j = m->e[i].hash & (nc - 1);
        while (ne[j].len || ne[j].hash) j = (j + 1) & (nc - 1);
        ne[j] = m->e[i];
    }
    free(m->e); m->e = ne; m->cap = nc;
    return 0;
}

/* Entry for key (inserted with val 0 if absent); NULL on allocation failure. Keys are non-empty. */
static SEntry *smap_get(SMap *m, const uint8_t *k, size_t len, uint64_t h, int insert) {
    if (h == 0) h = 1;
    size_t j = h & (m->cap - 1);
    for (;;) {
        SEntry *e = &m->e[j];
        if (!e->hash) break;
        if (e->hash == h && e->len == len && memcmp(m->arena + e->off, k, len) == 0) return e;
        j = (j + 1) & (m->cap - 1);
    }
    if (!insert) return NULL;
    if ((m->size + 1) * 2 > m->cap) { if (smap_grow(m)) return NULL; return smap_get(m, k, len, h, 1); }
    if (m->alen + len > m->acap) {
        size_t na = m->acap * 2; while (na < m->alen + len) na *= 2;
        uint8_t *a = realloc(m->arena, na); if (!a) return NULL;
        m->arena = a; m->acap = na;
    }
    memcpy(m->arena + m->alen, k, len);
    SEntry *e = &m->e[j];
    e->hash = h; e->off = m->alen; e->len = (uint32_t)len; e->val = 0;
    m->alen += len; m->size++;
    return e;
}

/* ------------------------------------------------------------------ WordCounter */
typedef struct {
    PyObject_HEAD
    int pattern;
    Special *sp; int nsp; PyObject *sp_keep;
    SMap map;
} WordCounter;

typedef struct {
    const uint8_t *s; size_t begin, end; int pattern;
    const Special *sp; int nsp; SMap map; int err;
} CountJob;

static void count_range(CountJob *j) {
    const uint8_t *s = j->s; size_t pos = j->begin, n = j->end;
    while (pos < n) {
        size_t at; int k = find_special(s, pos, n, j->sp, j->nsp, &at);
        size_t stop = k >= 0 ? at : n;
        while (pos < stop) {
            size_t e = next_pretoken(s, pos, stop, j->pattern);
            SEntry *ent = smap_get(&j->map, s + pos, e - pos, hash_bytes(s + pos, e - pos), 1);
            if (!ent) { j->err = 1; return; }
            ent->val++;
            pos = e;
        }
        if (k >= 0) pos = at + j->sp[k].len;
    }
}
static void *count_thread(void *arg) { count_range((CountJob *)arg); return NULL; }

/* A cut point at or after `from` where pre-tokenization restarts exactly: between a non-space ASCII
 * character and " " + ASCII letter, not inside a special token (see pretokenize.safe_cut). */
static size_t safe_cut_forward(const uint8_t *s, size_t from, size_t n, const Special *sp, int nsp) {
    for (size_t p = from < 1 ? 1 : from; p + 1 < n; p++) {
        if (s[p] != ' ') continue;
        uint8_t a = s[p - 1], b = s[p + 1];
        if (a >= 0x80 || a == ' ' || (a >= 9 && a <= 13)) continue;
        if (!((b >= 'a' && b <= 'z') || (b >= 'A' && b <= 'Z'))) continue;
        int inside = 0;
        for (int k = 0; k < nsp && !inside; k++) {
            size_t L = sp[k].len, lo = p >= L ? p - L + 1 : 0;
            size_t hi = p + L < n ? p + L : n;
            if (L && hi > lo && memmem(s + lo, hi - lo, sp[k].s, L)) inside = 1;
        }
        if (!inside) return p;
    }
    return n;
}

static int parse_specials(PyObject *list, Special **out, int *nout, PyObject **keep) {
    PyObject *seq = PySequence_Fast(list, "special tokens must be a sequence of (bytes, id)");
    if (!seq) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    Special *sp = calloc(n ? n : 1, sizeof(Special));
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *it = PySequence_Fast_GET_ITEM(seq, i);
        PyObject *b; int id = -1;
        if (PyBytes_Check(it)) b = it;
        else if (!PyArg_ParseTuple(it, "Si", &b, &id)) { free(sp); Py_DECREF(seq); return -1; }
        sp[i].s = (const uint8_t *)PyBytes_AS_STRING(b); sp[i].len = PyBytes_GET_SIZE(b); sp[i].id = id;
    }
    *out = sp; *nout = (int)n; *keep = seq;  /* seq keeps the bytes alive */
    return 0;
}

static int WordCounter_init(WordCounter *self, PyObject *args, PyObject *kw) {
    PyObject *specials;
    if (!PyArg_ParseTuple(args, "iO", &self->pattern, &specials)) return -1;
    if (parse_specials(specials, &self->sp, &self->nsp, &self->sp_keep)) return -1;
    if (smap_init(&self->map, 1 << 16)) { PyErr_NoMemory(); return -1; }
    return 0;
}
static void WordCounter_dealloc(WordCounter *self) {
    smap_free(&self->map); free(self->sp); Py_XDECREF(self->sp_keep);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *WordCounter_add(WordCounter *self, PyObject *args) {
    Py_buffer buf; int nthreads = 1;
    if (!PyArg_ParseTuple(args, "y*|i", &buf, &nthreads)) return NULL;
    const uint8_t *s = buf.buf; size_t n = (size_t)buf.len;
    if (nthreads < 1) nthreads = 1;
    if (n < ((size_t)1 << 16)) nthreads = 1;
    CountJob *jobs = calloc(nthreads, sizeof(CountJob));
    pthread_t *th = calloc(nthreads, sizeof(pthread_t));
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    size_t start = 0;
    for (int t = 0; t < nthreads; t++) {
        size_t end = t == nthreads - 1 ? n : safe_cut_forward(s, n / nthreads * (t + 1), n, self->sp, self->nsp);
        if (end < start) end = start;
        jobs[t] = (CountJob){s, start, end, self->pattern, self->sp, self->nsp, {0}, 0};
        if (smap_init(&jobs[t].map, 1 << 16)) err = 1;
        start = end;
    }
    if (!err) {
        for (int t = 1; t < nthreads; t++) pthread_create(&th[t], NULL, count_thread, &jobs[t]);
        count_range(&jobs[0]);
        for (int t = 1; t < nthreads; t++) pthread_join(th[t], NULL);
        for (int t = 0; t < nthreads && !err; t++) {
            SMap *m = &jobs[t].map;
            if (jobs[t].err) { err = 1; break; }
            for (size_t i = 0; i < m->cap; i++) {
                SEntry *e = &m->e[i];
                if (!e->hash) continue;
                SEntry *g = smap_get(&self->map, m->arena + e->off, e->len, e->hash, 1);
                if (!g) { err = 1; break; }
                g->val += e->val;
            }
        }
    }
    for (int t = 0; t < nthreads; t++) smap_free(&jobs[t].map);
    Py_END_ALLOW_THREADS
    free(jobs); free(th);
    PyBuffer_Release(&buf);
    if (err) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *WordCounter_items(WordCounter *self, PyObject *unused) {
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    for (size_t i = 0; i < self->map.cap; i++) {
        SEntry *e = &self->map.e[i];
        if (!e->hash) continue;
        PyObject *t = Py_BuildValue("(y#L)", self->map.arena + e->off, (Py_ssize_t)e->len, (long long)e->val);
        if (!t || PyList_Append(out, t)) { Py_XDECREF(t); Py_DECREF(out); return NULL; }
        Py_DECREF(t);
    }
    return out;
}

static Py_ssize_t WordCounter_len(WordCounter *self) { return (Py_ssize_t)self->map.size; }

static PyMethodDef WordCounter_methods[] = {
    {"add", (PyCFunction)WordCounter_add, METH_VARARGS,
     "add(buf: bytes, num_threads=1): pre-tokenize UTF-8 bytes and count the pre-tokens (GIL released)."},
    {"items", (PyCFunction)WordCounter_items, METH_NOARGS, "items() -> list[(bytes, count)]"},
    {NULL}};
static PySequenceMethods WordCounter_seq = {.sq_length = (lenfunc)WordCounter_len};
static PyTypeObject WordCounterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kiln.tokenizer._native.WordCounter",
    .tp_basicsize = sizeof(WordCounter), .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "WordCounter(pattern: int, special_tokens: list[bytes]): pre-token counts of byte buffers.",
    .tp_new = PyType_GenericNew, .tp_init = (initproc)WordCounter_init,
    .tp_dealloc = (destructor)WordCounter_dealloc, .tp_methods = WordCounter_methods,
    .tp_as_sequence = &WordCounter_seq,
};

/* Pre-tokens of a buffer as (start, end) offsets: used by tests against the regex reference. */
static PyObject *py_pretokenize(PyObject *self, PyObject *args) {
    Py_buffer buf; int pattern;
    if (!PyArg_ParseTuple(args, "y*i", &buf, &pattern)) return NULL;
    PyObject *out = PyList_New(0);
    const uint8_t *s = buf.buf; size_t n = buf.len, pos = 0;
    while (out && pos < n) {
        size_t e = next_pretoken(s, pos, n, pattern);
        PyObject *b = PyBytes_FromStringAndSize((const char *)s + pos, e - pos);
        if (!b || PyList_Append(out, b)) { Py_XDECREF(b); Py_CLEAR(out); }
        Py_XDECREF(b);
        pos = e;
    }
    PyBuffer_Release(&buf);
    return out;
}

/* ------------------------------------------------------------------ BPE training */
typedef struct { uint64_t key; int32_t idx; } PEntry;   /* pair (a,b) -> pair index */
typedef struct { PEntry *e; size_t cap, size; } PMap;

static int pmap_init(PMap *m, size_t cap) { m->cap = cap; m->size = 0; m->e = malloc(cap * sizeof(PEntry));
    if (!m->e) return -1; for (size_t i = 0; i < cap; i++) m->e[i].idx = -1; return 0; }
static int pmap_grow(PMap *m) {
    size_t nc = m->cap * 2; PEntry *ne = malloc(nc * sizeof(PEntry));
    if (!ne) return -1;
    for (size_t i = 0; i < nc; i++) ne[i].idx = -1;
    for (size_t i = 0; i < m->cap; i++) {
        if (m->e[i].idx < 0) continue;
        size_t j = hash_u64(m->e[i].key) & (nc - 1);
        while (ne[j].idx >= 0) j = (j + 1) & (nc - 1);
        ne[j] = m->e[i];
    }
    free(m->e); m->e = ne; m->cap = nc; return 0;
}
/* Slot for key: returns pointer; idx < 0 when absent (then the caller may fill it). */
static PEntry *pmap_slot(PMap *m, uint64_t key) {
    size_t j = hash_u64(key) & (m->cap - 1);
    while (m->e[j].idx >= 0 && m->e[j].key != key) j = (j + 1) & (m->cap - 1);
    return &m->e[j];
}

typedef struct {
    int32_t a, b; int64_t count, delta; int32_t heap_pos; int32_t dirty_stamp;
    int32_t *occ; int32_t nocc, capocc;  /* words that may contain the pair */
} Pair;

typedef struct {
    Pair *p; int32_t np, capp; PMap map;
    int32_t *heap; int32_t nheap;
    uint8_t **tok; int32_t *toklen; int32_t ntok, captok;
} Trainer;

static int tok_cmp(const Trainer *T, int32_t x, int32_t y) {
    int32_t lx = T->toklen[x], ly = T->toklen[y];
    int c = memcmp(T->tok[x], T->tok[y], lx < ly ? lx : ly);
    if (c) return c;
    return (lx > ly) - (lx < ly);
}
/* > 0 when pair i ranks above pair j: higher count, then lexicographically greater (bytes_a, bytes_b). */
static int pair_better(const Trainer *T, int32_t i, int32_t j) {
    const Pair *P = &T->p[i], *Q = &T->p[j];
    if (P->count != Q->count) return P->count > Q->count;
    int c = tok_cmp(T, P->a, Q->a);
    if (c) return c > 0;
    c = tok_cmp(T, P->b, Q->b);
    if (c) return c > 0;
    /* equal bytes (two ids can spell the same string): the smaller ids first, as the reference */
    if (P->a != Q->a) return P->a < Q->a;
    return P->b < Q->b;
}
static void heap_swap(Trainer *T, int32_t x, int32_t y) {
    int32_t px = T->heap[x], py = T->heap[y];
    T->heap[x] = py; T->heap[y] = px; T->p[py].heap_pos = x; T->p[px].heap_pos = y;
}
static void heap_up(Trainer *T, int32_t x) {
    while (x > 0) { int32_t u = (x - 1) / 2; if (!pair_better(T, T->heap[x], T->heap[u])) break; heap_swap(T, x, u); x = u; }
}
static void heap_down(Trainer *T, int32_t x) {
    for (;;) {
        int32_t l = 2 * x + 1, r = l + 1, m = x;
        if (l < T->nheap && pair_better(T, T->heap[l], T->heap[m])) m = l;
        if (r < T->nheap && pair_better(T, T->heap[r], T->heap[m])) m = r;
        if (m == x) break;
        heap_swap(T, x, m); x = m;
    }
}
static void heap_remove(Trainer *T, int32_t pi) {
    int32_t x = T->p[pi].heap_pos, last = T->nheap - 1;
    if (x < 0) return;
    if (x != last) { heap_swap(T, x, last); }
    T->nheap--; T->p[pi].heap_pos = -1;
    if (x != last) { heap_up(T, x); heap_down(T, x); }
}
static void heap_fix(Trainer *T, int32_t pi) {
    Pair *P = &T->p[pi];
    if (P->count <= 0) { heap_remove(T, pi); return; }
    if (P->heap_pos < 0) { P->heap_pos = T->nheap; T->heap[T->nheap++] = pi; heap_up(T, P->heap_pos); return; }
    heap_up(T, P->heap_pos); heap_down(T, P->heap_pos);
}

static int32_t pair_index(Trainer *T, int32_t a, int32_t b) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    PEntry *e = pmap_slot(&T->map, key);
    if (e->idx >= 0) return e->idx;
    if (T->np == T->capp) {
        int32_t nc = T->capp * 2; Pair *np = realloc(T->p, nc * sizeof(Pair)); int32_t *nh = realloc(T->heap, nc * sizeof(int32_t));
        if (!np || !nh) { if (np) T->p = np; if (nh) T->heap = nh; return -1; }
        T->p = np; T->heap = nh; T->capp = nc;
    }
    int32_t idx = T->np++;
    T->p[idx] = (Pair){a, b, 0, 0, -1, -1, NULL, 0, 0};
    e->key = key; e->idx = idx; T->map.size++;
    if (T->map.size * 2 > T->map.cap && pmap_grow(&T->map)) return -1;
    return idx;
}
static int occ_add(Pair *P, int32_t w) {
    if (P->nocc && P->occ[P->nocc - 1] == w) return 0;
    if (P->nocc == P->capocc) {
        int32_t nc = P->capocc ? P->capocc * 2 : 4; int32_t *o = realloc(P->occ, nc * sizeof(int32_t));
        if (!o) return -1; P->occ = o; P->capocc = nc;
    }
    P->occ[P->nocc++] = w; return 0;
}

static PyObject *py_merge_words(PyObject *self, PyObject *args) {
    PyObject *items; int num_merges;
    if (!PyArg_ParseTuple(args, "Oi", &items, &num_merges)) return NULL;
    PyObject *seq = PySequence_Fast(items, "items must be a sequence of (bytes, count)");
    if (!seq) return NULL;
    Py_ssize_t nw = PySequence_Fast_GET_SIZE(seq);
    /* words: symbols in one arena; each word has offset, length, frequency */
    size_t total = 0;
    for (Py_ssize_t i = 0; i < nw; i++) {
        PyObject *t = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(t, 0))) {
            Py_DECREF(seq); PyErr_SetString(PyExc_TypeError, "items must be (bytes, count) tuples"); return NULL;
        }
        total += PyBytes_GET_SIZE(PyTuple_GET_ITEM(t, 0));
    }
    int32_t *sym = malloc((total + 1) * sizeof(int32_t)), *wlen = malloc((nw + 1) * sizeof(int32_t));
    size_t *woff = malloc((nw + 1) * sizeof(size_t)); int64_t *wfreq = malloc((nw + 1) * sizeof(int64_t));
    int32_t *wstamp = malloc((nw + 1) * sizeof(int32_t));
    Trainer T = {0};
    PyObject *out = NULL;
    int32_t *tmp = NULL; size_t tmpcap = 0;
    int32_t *dirty = NULL; size_t ndirty = 0, capdirty = 0;
    if (!sym || !wlen || !woff || !wfreq || !wstamp) goto nomem;
    size_t off = 0;
    for (Py_ssize_t i = 0; i < nw; i++) {
        PyObject *t = PySequence_Fast_GET_ITEM(seq, i);
        PyObject *b = PyTuple_GET_ITEM(t, 0);
        long long f = PyLong_AsLongLong(PyTuple_GET_ITEM(t, 1));
        if (f == -1 && PyErr_Occurred()) goto fail;
        const uint8_t *s = (const uint8_t *)PyBytes_AS_STRING(b); Py_ssize_t L = PyBytes_GET_SIZE(b);
        woff[i] = off; wlen[i] = (int32_t)L; wfreq[i] = f; wstamp[i] = -1;
        for (Py_ssize_t k = 0; k < L; k++) sym[off + k] = s[k];
        off += L;
    }
    T.capp = 1 << 16; T.p = malloc(T.capp * sizeof(Pair)); T.heap = malloc(T.capp * sizeof(int32_t));
    T.captok = 256 + (num_merges > 0 ? num_merges : 0); T.tok = malloc(T.captok * sizeof(uint8_t *));
    T.toklen = malloc(T.captok * sizeof(int32_t));
    if (!T.p || !T.heap || !T.tok || !T.toklen || pmap_init(&T.map, 1 << 17)) goto nomem;
    for (int i = 0; i < 256; i++) { T.tok[i] = malloc(1); T.tok[i][0] = (uint8_t)i; T.toklen[i] = 1; }
    T.ntok = 256;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t w = 0; w < nw && T.np >= 0; w++) {
        int32_t *s = sym + woff[w];
        for (int32_t k = 0; k + 1 < wlen[w]; k++) {
            int32_t pi = pair_index(&T, s[k], s[k + 1]);
            if (pi < 0 || occ_add(&T.p[pi], (int32_t)w)) { T.np = -1; break; }
            T.p[pi].count += wfreq[w];
        }
    }
    if (T.np >= 0) for (int32_t i = 0; i < T.np; i++) heap_fix(&T, i);
    Py_END_ALLOW_THREADS
    if (T.np < 0) goto nomem;
    out = PyList_New(0);
    if (!out) goto fail;
    for (int m = 0; m < num_merges && T.nheap > 0; m++) {
        int32_t best = T.heap[0];
        int32_t a = T.p[best].a, b = T.p[best].b, nt = T.ntok;
        /* record the merge */
        int32_t la = T.toklen[a], lb = T.toklen[b];
        T.tok[nt] = malloc(la + lb);
        if (!T.tok[nt]) goto nomem;
        memcpy(T.tok[nt], T.tok[a], la); memcpy(T.tok[nt] + la, T.tok[b], lb);
        T.toklen[nt] = la + lb; T.ntok++;
        PyObject *pr = Py_BuildValue("(y#y#)", T.tok[a], (Py_ssize_t)la, T.tok[b], (Py_ssize_t)lb);
        if (!pr || PyList_Append(out, pr)) { Py_XDECREF(pr); goto fail; }
        Py_DECREF(pr);
        /* apply it to every word holding the pair; count deltas as we go */
        int err = 0;
        Pair *B = &T.p[best];
        int32_t nocc = B->nocc; int32_t *occ = B->occ; B->occ = NULL; B->nocc = B->capocc = 0;
        ndirty = 0;
        for (int32_t oi = 0; oi < nocc && !err; oi++) {
            int32_t w = occ[oi];
            if (wstamp[w] == m) continue;
            wstamp[w] = m;
            int32_t *s = sym + woff[w], L = wlen[w];
            int found = 0;
            for (int32_t k = 0; k + 1 < L; k++) if (s[k] == a && s[k + 1] == b) { found = 1; break; }
            if (!found) continue;
            if ((size_t)L > tmpcap) { tmpcap = L * 2; int32_t *nt2 = realloc(tmp, tmpcap * sizeof(int32_t)); if (!nt2) { err = 1; break; } tmp = nt2; }
            int32_t nl = 0;
            for (int32_t k = 0; k < L;) {
                if (k + 1 < L && s[k] == a && s[k + 1] == b) { tmp[nl++] = nt; k += 2; }
                else tmp[nl++] = s[k++];
            }
            int64_t f = wfreq[w];
            /* old pairs out, new pairs in */
            for (int pass = 0; pass < 2 && !err; pass++) {
                int32_t *q = pass ? tmp : s, ql = pass ? nl : L;
                for (int32_t k = 0; k + 1 < ql; k++) {
                    int32_t pi = pair_index(&T, q[k], q[k + 1]);
                    if (pi < 0) { err = 1; break; }
                    Pair *P = &T.p[pi];
                    P->delta += pass ? f : -f;  /* applied after the step: the heap must stay valid per fix */
                    if (pass && (q[k] == nt || q[k + 1] == nt) && occ_add(P, w)) { err = 1; break; }
                    if (P->dirty_stamp != m) {
                        P->dirty_stamp = m;
                        if (ndirty == capdirty) { capdirty = capdirty ? capdirty * 2 : 1024; int32_t *d = realloc(dirty, capdirty * sizeof(int32_t)); if (!d) { err = 1; break; } dirty = d; }
                        dirty[ndirty++] = pi;
                    }
                }
            }
            memcpy(s, tmp, nl * sizeof(int32_t)); wlen[w] = nl;
        }
        free(occ);
        if (err) goto nomem;
        T.p[best].count = T.p[best].delta = 0;
        heap_fix(&T, best);
        for (size_t d = 0; d < ndirty; d++) {
            Pair *P = &T.p[dirty[d]];
            if (dirty[d] == best || !P->delta) continue;
            P->count += P->delta; P->delta = 0;
            heap_fix(&T, dirty[d]);
        }
    }
    goto done;
nomem:
    PyErr_NoMemory();
fail:
    Py_CLEAR(out);
done:
    Py_DECREF(seq);
    free(sym); free(wlen); free(woff); free(wfreq); free(wstamp); free(tmp); free(dirty);
    if (T.p) for (int32_t i = 0; i < T.np; i++) free(T.p[i].occ);
    free(T.p); free(T.heap); free(T.map.e);
    if (T.tok) for (int32_t i = 0; i < T.ntok; i++) free(T.tok[i]);
    free(T.tok); free(T.toklen);
    return out;
}

/* ------------------------------------------------------------------ Encoder */
typedef struct { uint64_t key; int32_t rank, id; } REntry;   /* (a,b) -> (rank, merged id); rank<0 empty */

/* Front cache: short pre-tokens (<= 8 bytes, <= 2 ids: most of them) in a small direct-mapped
 * table that stays in L2; the values never go stale (BPE is a pure function of the bytes). */
#define FRONT_BITS 12
typedef struct { uint64_t k8; uint32_t len, n; int32_t ids[2]; } FEntry;

typedef struct {
    SMap map;            /* pre-token bytes -> (offset << 8 | length) into ids; length < 256 */
    int32_t *ids; size_t nids, capids;
    size_t max_entries;
    FEntry *front;
} Cache;

static inline size_t front_slot(uint64_t k8, size_t len) {
    return (size_t)(((k8 ^ (len << 59)) * 0x9E3779B97F4A7C15ULL) >> (64 - FRONT_BITS));
}

typedef struct {
    PyObject_HEAD
    int pattern;
    int32_t byte_ids[256];
    REntry *ranks; size_t rcap;
    Special *sp; int nsp; PyObject *sp_keep;
    Cache cache;
} Encoder;

typedef struct { int32_t *v; size_t n, cap; int err; } IVec;
static inline void ivec_push(IVec *v, int32_t x) {
    if (v->n == v->cap) {
        size_t nc = v->cap ? v->cap * 2 : 256; int32_t *p = realloc(v->v, nc * sizeof(int32_t));
        if (!p) { v->err = 1; return; }
        v->v = p; v->cap = nc;
    }
    v->v[v->n++] = x;
}

static inline const REntry *rank_of(const Encoder *E, int32_t a, int32_t b) {
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    size_t j = hash_u64(key) & (E->rcap - 1);
    while (E->ranks[j].rank >= 0) {
        if (E->ranks[j].key == key) return &E->ranks[j];
        j = (j + 1) & (E->rcap - 1);
    }
    return NULL;
}

/* BPE of one pre-token into `out`: repeatedly merge every occurrence of the lowest-rank pair. */
static void bpe_piece(const Encoder *E, const uint8_t *s, size_t n, IVec *out, int32_t *work) {
    for (size_t k = 0; k < n; k++) work[k] = E->byte_ids[s[k]];
    size_t L = n;
    while (L > 1) {
        int32_t best_rank = INT32_MAX, best_id = -1, ba = 0, bb = 0;
        for (size_t k = 0; k + 1 < L; k++) {
            const REntry *r = rank_of(E, work[k], work[k + 1]);
            if (r && r->rank < best_rank) { best_rank = r->rank; best_id = r->id; ba = work[k]; bb = work[k + 1]; }
        }
        if (best_id < 0) break;
        size_t w = 0;
        for (size_t k = 0; k < L;) {
            if (k + 1 < L && work[k] == ba && work[k + 1] == bb) { work[w++] = best_id; k += 2; }
            else work[w++] = work[k++];
        }
        L = w;
    }
    for (size_t k = 0; k < L; k++) ivec_push(out, work[k]);
}

static int cache_init(Cache *c, size_t max_entries) {
    memset(c, 0, sizeof(*c));
    c->max_entries = max_entries; c->nids = 0; c->capids = 1 << 16;
    c->ids = malloc(c->capids * sizeof(int32_t));
    c->front = calloc((size_t)1 << FRONT_BITS, sizeof(FEntry));  /* len 0 = empty */
    return (!c->ids || !c->front || smap_init(&c->map, 1 << 12)) ? -1 : 0;
}
static void cache_free(Cache *c) { smap_free(&c->map); free(c->ids); free(c->front); c->ids = NULL; c->front = NULL; }

/* Encode s[0:n] (no special tokens) into out; pieces' results come from / go to the cache. */
static void encode_ordinary(const Encoder *E, Cache *c, const uint8_t *s, size_t n, IVec *out, IVec *work) {
    size_t pos = 0;
    while (pos < n && !out->err) {
        size_t e = next_pretoken(s, pos, n, E->pattern), len = e - pos;
        if (len == 1) { ivec_push(out, E->byte_ids[s[pos]]); pos = e; continue; }
        FEntry *fe = NULL;
        if (len <= 8) {
            uint64_t k8 = 0; memcpy(&k8, s + pos, len);
            fe = &c->front[front_slot(k8, len)];
            if (fe->len == len && fe->k8 == k8) {
                ivec_push(out, fe->ids[0]);
                if (fe->n == 2) ivec_push(out, fe->ids[1]);
                pos = e; continue;
            }
            if (fe->len) fe = NULL;  /* occupied by another pre-token: keep it, skip storing */
            else fe->k8 = k8;
        }
        size_t before = out->n;
        uint64_t h = 0; SEntry *ent = NULL;
        if (len < 64) {
            h = hash_bytes(s + pos, len);
            ent = smap_get(&c->map, s + pos, len, h, 0);
            if (ent) {
                int64_t v = ent->val; size_t o = (size_t)(v >> 8), l = (size_t)(v & 0xFF);
                for (size_t k = 0; k < l; k++) ivec_push(out, c->ids[o + k]);
                if (fe && l <= 2 && !out->err) { fe->len = (uint32_t)len; fe->n = (uint32_t)l; memcpy(fe->ids, out->v + before, l * sizeof(int32_t)); }
                pos = e; continue;
            }
        }
        if (work->cap < len) {
            int32_t *p = realloc(work->v, len * 2 * sizeof(int32_t));
            if (!p) { out->err = 1; return; }
            work->v = p; work->cap = len * 2;
        }
        bpe_piece(E, s + pos, len, out, work->v);
        if (fe && out->n - before <= 2 && !out->err) {
            fe->len = (uint32_t)len; fe->n = (uint32_t)(out->n - before);
            memcpy(fe->ids, out->v + before, fe->n * sizeof(int32_t));
        }
        if (len < 64) {
            size_t l = out->n - before;
            if (c->map.size >= c->max_entries) { smap_clear(&c->map); c->nids = 0; }
            if (c->nids + l > c->capids) {
                size_t nc = c->capids * 2; int32_t *p = realloc(c->ids, nc * sizeof(int32_t));
                if (p) { c->ids = p; c->capids = nc; }
            }
            if (c->nids + l <= c->capids) {
                SEntry *ne = smap_get(&c->map, s + pos, len, h, 1);
                if (ne) {
                    memcpy(c->ids + c->nids, out->v + before, l * sizeof(int32_t));
                    ne->val = ((int64_t)c->nids << 8) | (int64_t)l;
                    c->nids += l;
                }
            }
        }
        pos = e;
    }
}

static void encode_text(const Encoder *E, Cache *c, const uint8_t *s, size_t n, int allow_special, IVec *out, IVec *work) {
    size_t pos = 0;
    while (pos < n && !out->err) {
        size_t at = n; int k = allow_special ? find_special(s, pos, n, E->sp, E->nsp, &at) : -1;
        size_t stop = k >= 0 ? at : n;
        encode_ordinary(E, c, s + pos, stop - pos, out, work);
        if (k < 0) break;
        ivec_push(out, E->sp[k].id);
        pos = at + E->sp[k].len;
    }
}

static PyObject *ivec_to_list(const int32_t *v, size_t n) {
    PyObject *l = PyList_New((Py_ssize_t)n);
    if (!l) return NULL;
    for (size_t i = 0; i < n; i++) {
        PyObject *x = PyLong_FromLong(v[i]);
        if (!x) { Py_DECREF(l); return NULL; }
        PyList_SET_ITEM(l, (Py_ssize_t)i, x);
    }
    return l;
}

static int Encoder_init(Encoder *self, PyObject *args, PyObject *kw) {
    PyObject *byte_ids, *merges, *specials;
    if (!PyArg_ParseTuple(args, "OOOi", &byte_ids, &merges, &specials, &self->pattern)) return -1;
    PyObject *bi = PySequence_Fast(byte_ids, "byte_ids must be a sequence of 256 ints");
    if (!bi) return -1;
    if (PySequence_Fast_GET_SIZE(bi) != 256) { Py_DECREF(bi); PyErr_SetString(PyExc_ValueError, "byte_ids must have 256 ids"); return -1; }
    for (int i = 0; i < 256; i++) self->byte_ids[i] = (int32_t)PyLong_AsLong(PySequence_Fast_GET_ITEM(bi, i));
    Py_DECREF(bi);
    if (PyErr_Occurred()) return -1;
    PyObject *ms = PySequence_Fast(merges, "merges must be a sequence of (a, b, merged) id triples");
    if (!ms) return -1;
    Py_ssize_t nm = PySequence_Fast_GET_SIZE(ms);
    self->rcap = 1024; while (self->rcap < (size_t)nm * 2 + 2) self->rcap *= 2;
    self->ranks = malloc(self->rcap * sizeof(REntry));
    if (!self->ranks) { Py_DECREF(ms); PyErr_NoMemory(); return -1; }
    for (size_t i = 0; i < self->rcap; i++) self->ranks[i].rank = -1;
    for (Py_ssize_t r = 0; r < nm; r++) {
        int a, b, id;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(ms, r), "iii", &a, &b, &id)) { Py_DECREF(ms); return -1; }
        uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
        size_t j = hash_u64(key) & (self->rcap - 1);
        while (self->ranks[j].rank >= 0 && self->ranks[j].key != key) j = (j + 1) & (self->rcap - 1);
        if (self->ranks[j].rank < 0) { self->ranks[j].key = key; self->ranks[j].rank = (int32_t)r; self->ranks[j].id = id; }
    }
    Py_DECREF(ms);
    if (parse_specials(specials, &self->sp, &self->nsp, &self->sp_keep)) return -1;
    if (cache_init(&self->cache, 1 << 18)) { PyErr_NoMemory(); return -1; }
    return 0;
}
static void Encoder_dealloc(Encoder *self) {
    free(self->ranks); free(self->sp); Py_XDECREF(self->sp_keep); cache_free(&self->cache);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *encode_common(Encoder *self, PyObject *arg, int allow_special) {
    Py_ssize_t n; const char *s = PyUnicode_AsUTF8AndSize(arg, &n);
    if (!s) return NULL;  /* UnicodeEncodeError for lone surrogates: the caller falls back */
    IVec out = {0}, work = {0};
    encode_text(self, &self->cache, (const uint8_t *)s, (size_t)n, allow_special, &out, &work);
    PyObject *res = out.err ? PyErr_NoMemory() : ivec_to_list(out.v, out.n);
    free(out.v); free(work.v);
    return res;
}
static PyObject *Encoder_encode(Encoder *self, PyObject *arg) { return encode_common(self, arg, 1); }
static PyObject *Encoder_encode_ordinary(Encoder *self, PyObject *arg) { return encode_common(self, arg, 0); }

/* encode_bytes(buf, allow_special=True) -> bytes of little-endian uint32 ids (GIL released). */
static PyObject *Encoder_encode_bytes(Encoder *self, PyObject *args) {
    Py_buffer buf; int allow_special = 1;
    if (!PyArg_ParseTuple(args, "y*|p", &buf, &allow_special)) return NULL;
    IVec out = {0}, work = {0};
    Cache c;
    if (cache_init(&c, 1 << 18)) { PyBuffer_Release(&buf); return PyErr_NoMemory(); }
    Py_BEGIN_ALLOW_THREADS
    encode_text(self, &c, buf.buf, (size_t)buf.len, allow_special, &out, &work);
    Py_END_ALLOW_THREADS
    cache_free(&c);
    PyBuffer_Release(&buf);
    PyObject *res = out.err ? PyErr_NoMemory() : PyBytes_FromStringAndSize((const char *)out.v, out.n * sizeof(int32_t));
    free(out.v); free(work.v);
    return res;
}

typedef struct {
    const Encoder *E; const char **s; Py_ssize_t *n; IVec *outs; size_t count;
    size_t *next; pthread_mutex_t *mu; int allow_special; int err;
} BatchJob;

static void *batch_thread(void *arg) {
    BatchJob *j = arg; Cache c; IVec work = {0};
    if (cache_init(&c, 1 << 16)) { pthread_mutex_lock(j->mu); j->err = 1; pthread_mutex_unlock(j->mu); cache_free(&c); return NULL; }
    for (;;) {
        pthread_mutex_lock(j->mu); size_t i = (*j->next)++; pthread_mutex_unlock(j->mu);
        if (i >= j->count) break;
        if (!j->s[i]) continue;
        encode_text(j->E, &c, (const uint8_t *)j->s[i], (size_t)j->n[i], j->allow_special, &j->outs[i], &work);
    }
    cache_free(&c); free(work.v);
    return NULL;
}

/* Encode every text of `seq` on up to nthreads threads into outs[i]; s[i] is NULL where a text is
 * not encodable as UTF-8 (lone surrogates). Returns 0, or -1 with an exception set. */
static int batch_encode(Encoder *self, PyObject *seq, int nthreads, int allow_special, const char **s, Py_ssize_t *n, IVec *outs) {
    size_t count = (size_t)PySequence_Fast_GET_SIZE(seq), total = 0;
    for (size_t i = 0; i < count; i++) {
        PyObject *t = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyUnicode_Check(t)) { PyErr_Format(PyExc_TypeError, "texts[%zd] is %s, not str", (Py_ssize_t)i, Py_TYPE(t)->tp_name); return -1; }
        s[i] = PyUnicode_AsUTF8AndSize(t, &n[i]);
        if (!s[i]) PyErr_Clear();
        else total += (size_t)n[i];
    }
    if (nthreads < 1) nthreads = 1;
    if ((size_t)nthreads > count) nthreads = count ? (int)count : 1;
    if (total < ((size_t)1 << 15)) nthreads = 1;
    size_t next = 0; pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    BatchJob job = {self, s, n, outs, count, &next, &mu, allow_special, 0};
    pthread_t *th = calloc(nthreads, sizeof(pthread_t));
    if (!th) { PyErr_NoMemory(); return -1; }
    Py_BEGIN_ALLOW_THREADS
    for (int t = 1; t < nthreads; t++) pthread_create(&th[t], NULL, batch_thread, &job);
    batch_thread(&job);
    for (int t = 1; t < nthreads; t++) pthread_join(th[t], NULL);
    Py_END_ALLOW_THREADS
    free(th);
    for (size_t i = 0; i < count; i++) if (outs[i].err) job.err = 1;
    if (job.err) { PyErr_NoMemory(); return -1; }
    return 0;
}

/* encode_batch(texts, num_threads, allow_special=True) -> list[list[int] | None]; None where a text
 * is not encodable as UTF-8 (lone surrogates), for the caller to encode in Python. */
static PyObject *Encoder_encode_batch(Encoder *self, PyObject *args) {
    PyObject *texts; int nthreads = 1, allow_special = 1;
    if (!PyArg_ParseTuple(args, "O|ip", &texts, &nthreads, &allow_special)) return NULL;
    PyObject *seq = PySequence_Fast(texts, "texts must be a sequence of str");
    if (!seq) return NULL;
    size_t count = (size_t)PySequence_Fast_GET_SIZE(seq);
    const char **s = calloc(count + 1, sizeof(char *)); Py_ssize_t *n = calloc(count + 1, sizeof(Py_ssize_t));
    IVec *outs = calloc(count + 1, sizeof(IVec));
    PyObject *res = NULL;
    if (!s || !n || !outs) { PyErr_NoMemory(); goto done; }
    if (batch_encode(self, seq, nthreads, allow_special, s, n, outs)) goto done;
    res = PyList_New((Py_ssize_t)count);
    for (size_t i = 0; res && i < count; i++) {
        PyObject *l;
        if (!s[i]) { l = Py_None; Py_INCREF(l); }
        else l = ivec_to_list(outs[i].v, outs[i].n);
        if (!l) { Py_CLEAR(res); break; }
        PyList_SET_ITEM(res, (Py_ssize_t)i, l);
    }
done:
    if (outs) for (size_t i = 0; i < count; i++) free(outs[i].v);
    free(outs); free(s); free(n);
    Py_DECREF(seq);
    return res;
}

/* encode_batch_flat(texts, num_threads, allow_special=True, append_id=-1) -> (ids: bytes of uint32,
 * lengths: bytes of int64); append_id >= 0 is appended after each text (and counted in its length).
 * Returns None if a text is not encodable as UTF-8 (lone surrogates). */
static PyObject *Encoder_encode_batch_flat(Encoder *self, PyObject *args) {
    PyObject *texts; int nthreads = 1, allow_special = 1, append_id = -1;
    if (!PyArg_ParseTuple(args, "O|ipi", &texts, &nthreads, &allow_special, &append_id)) return NULL;
    PyObject *seq = PySequence_Fast(texts, "texts must be a sequence of str");
    if (!seq) return NULL;
    size_t count = (size_t)PySequence_Fast_GET_SIZE(seq);
    const char **s = calloc(count + 1, sizeof(char *)); Py_ssize_t *n = calloc(count + 1, sizeof(Py_ssize_t));
    IVec *outs = calloc(count + 1, sizeof(IVec));
    PyObject *res = NULL, *ids = NULL, *lens = NULL;
    if (!s || !n || !outs) { PyErr_NoMemory(); goto done; }
    if (batch_encode(self, seq, nthreads, allow_special, s, n, outs)) goto done;
    size_t total = 0, extra = append_id >= 0 ? 1 : 0;
    for (size_t i = 0; i < count; i++) {
        if (!s[i]) { res = Py_None; Py_INCREF(res); goto done; }  /* the caller encodes in Python */
        total += outs[i].n + extra;
    }
    ids = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(total * sizeof(uint32_t)));
    lens = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(count * sizeof(int64_t)));
    if (!ids || !lens) goto done;
    uint32_t *dst = (uint32_t *)PyBytes_AS_STRING(ids); int64_t *ln = (int64_t *)PyBytes_AS_STRING(lens);
    for (size_t i = 0; i < count; i++) {
        memcpy(dst, outs[i].v, outs[i].n * sizeof(uint32_t)); dst += outs[i].n;
        if (extra) *dst++ = (uint32_t)append_id;
        ln[i] = (int64_t)(outs[i].n + extra);
    }
    res = PyTuple_Pack(2, ids, lens);
done:
    Py_XDECREF(ids); Py_XDECREF(lens);
    if (outs) for (size_t i = 0; i < count; i++) free(outs[i].v);
    free(outs); free(s); free(n);
    Py_DECREF(seq);
    return res;
}

static PyMethodDef Encoder_methods[] = {
    {"encode", (PyCFunction)Encoder_encode, METH_O, "encode(text) -> list[int], special tokens recognized."},
    {"encode_ordinary", (PyCFunction)Encoder_encode_ordinary, METH_O, "encode_ordinary(text) -> list[int]."},
    {"encode_bytes", (PyCFunction)Encoder_encode_bytes, METH_VARARGS, "encode_bytes(buf, allow_special=True) -> uint32 LE bytes."},
    {"encode_batch", (PyCFunction)Encoder_encode_batch, METH_VARARGS, "encode_batch(texts, num_threads=1, allow_special=True)."},
    {"encode_batch_flat", (PyCFunction)Encoder_encode_batch_flat, METH_VARARGS,
     "encode_batch_flat(texts, num_threads=1, allow_special=True, append_id=-1) -> (uint32 bytes, int64 lengths bytes)."},
    {NULL}};
static PyTypeObject EncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kiln.tokenizer._native.Encoder",
    .tp_basicsize = sizeof(Encoder), .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Encoder(byte_ids, merges: [(a, b, merged)], specials: [(bytes, id)], pattern: int)",
    .tp_new = PyType_GenericNew, .tp_init = (initproc)Encoder_init,
    .tp_dealloc = (destructor)Encoder_dealloc, .tp_methods = Encoder_methods,
};

/* ------------------------------------------------------------------ module */
static PyMethodDef module_methods[] = {
    {"merge_words", py_merge_words, METH_VARARGS, "merge_words(items: [(bytes, count)], num_merges) -> [(bytes, bytes)]"},
    {"pretokenize", py_pretokenize, METH_VARARGS, "pretokenize(buf: bytes, pattern: int) -> list[bytes]"},
    {NULL}};
static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_native", "C core of kiln.tokenizer.", -1, module_methods};

PyMODINIT_FUNC PyInit__native(void) {
    init_classes();
    if (PyType_Ready(&WordCounterType) < 0 || PyType_Ready(&EncoderType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    Py_INCREF(&WordCounterType); PyModule_AddObject(m, "WordCounter", (PyObject *)&WordCounterType);
    Py_INCREF(&EncoderType); PyModule_AddObject(m, "Encoder", (PyObject *)&EncoderType);
    PyModule_AddIntConstant(m, "PAT_GPT2", PAT_GPT2);
    PyModule_AddIntConstant(m, "PAT_GPT2_DIGITS", PAT_GPT2_DIGITS);
    PyModule_AddIntConstant(m, "PAT_CL100K", PAT_CL100K);
    return m;
}
