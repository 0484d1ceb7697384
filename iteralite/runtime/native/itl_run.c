/* itl-run: the standalone runtime's command line. Reads a compact mixed-precision artifact
 * (itl_artifact.c) and a binary tokenizer (iteralite/data/tokbin.py's format), prefills the prompt
 * and generates with the native step (itl_gen.c).
 *
 *   itl-run ARTIFACT TOKENIZER_BIN [-p PROMPT] [-n N] [-t TEMP] [-k TOPK] [--top-p P] [-s SEED] [--ids] [--exact]
 *
 * --exact: float activations in every matmul (the native step's ITL_ACT_F32: the eager model's
 * arithmetic up to float rounding) instead of int8 activations per block (the default, faster).
 * stdout: the prompt, then the story as generated (flushed per token); with --ids the generated
 * token ids on one line, space-separated (written at the end). stderr, last line:
 *   itl-run: <n> tokens in <ms> ms, <x> tok/s (prompt <p> tokens, <ms> ms)
 * Exit 0; bad input: one line `itl-run: error: ...` and exit 2 (1 for I/O errors). */
#include <errno.h>
#include <stdarg.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "itl_artifact.h"
#include "itl_gen.h"
#include "itl_text.h"

#define TEMP_LO 1e-3
#define TEMP_HI 100.0
#define MAX_TOKENS 100000000L

static const char *USAGE =
    "usage: itl-run ARTIFACT TOKENIZER_BIN [-p PROMPT] [-n N] [-t TEMP] [-k TOPK] [--top-p P] [-s SEED] [--ids]\n"
    "               [--exact]\n"
    "  -p PROMPT   the prompt (default \"Once upon a time\")\n"
    "  -n N        tokens to generate (default 200)\n"
    "  -t TEMP     temperature: 0 = greedy, else in [0.001, 100] (default 0.8)\n"
    "  -k TOPK     keep the k most likely tokens, 0 = all (default 0)\n"
    "  --top-p P   keep the most likely tokens up to mass P in (0, 1], 1 = all (default 0.9)\n"
    "  -s SEED     the sampler's seed, 0..2**64-1 (default 1)\n"
    "  --ids       print the generated token ids instead of the text\n"
    "  --exact     float activations (the eager model's arithmetic up to float rounding; slower)\n"
    "              instead of int8 activations per block\n"
    "It generates exactly N tokens (an <|endoftext|> starts the next story). The environment variable\n"
    "ITERALITE_NATIVE_ISA=scalar (or avx2) makes the native step start at that code path;\n"
    "ITERALITE_NATIVE_ACT=f32 is --exact.\n";

#if defined(__GNUC__)
static int die(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#endif
static int die(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("itl-run: error: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return code;
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int parse_long(const char *s, long *v) {
    char *end;
    errno = 0;
    *v = strtol(s, &end, 10);
    return *s && !*end && !errno;
}

static int parse_double(const char *s, double *v) {
    char *end;
    errno = 0;
    *v = strtod(s, &end);
    return *s && !*end && errno != ERANGE;
}

static int parse_u64(const char *s, unsigned long long *v) {
    char *end;
    if (!*s || *s == '-' || *s == '+' || *s == ' ') return 0;
    errno = 0;
    *v = strtoull(s, &end, 10);
    return !*end && !errno;
}

/* the whole file; NULL with *why set (errno text) */
static uint8_t *read_file(const char *path, size_t *len, const char **why) {
    struct stat st;
    if (stat(path, &st)) { *why = strerror(errno); return NULL; }
    if (!S_ISREG(st.st_mode)) { *why = S_ISDIR(st.st_mode) ? "is a directory" : "is not a regular file"; return NULL; }
    FILE *f = fopen(path, "rb");
    if (!f) { *why = strerror(errno); return NULL; }
    uint8_t *buf = malloc((size_t)st.st_size + 1);
    if (!buf) { fclose(f); *why = "out of memory"; return NULL; }
    *len = fread(buf, 1, (size_t)st.st_size + 1, f);
    if (ferror(f)) { free(buf); fclose(f); *why = "read error"; return NULL; }
    fclose(f);
    return buf;
}

int main(int argc, char **argv) {
    const char *pos[2] = {NULL, NULL}, *prompt = "Once upon a time";
    long n = 200, top_k = 0;
    double temp = 0.8, top_p = 0.9;
    unsigned long long seed = 1;
    int ids_only = 0, exact = 0, npos = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            fputs(USAGE, stdout);
            return 0;
        }
        if (!strcmp(a, "--ids")) { ids_only = 1; continue; }
        if (!strcmp(a, "--exact")) { exact = 1; continue; }
        int takes = !strcmp(a, "-p") || !strcmp(a, "-n") || !strcmp(a, "-t") || !strcmp(a, "-k") ||
                    !strcmp(a, "--top-p") || !strcmp(a, "-s");
        if (takes) {
            if (i + 1 >= argc) return die(2, "%s needs a value (itl-run --help)", a);
            const char *v = argv[++i];
            if (!strcmp(a, "-p")) prompt = v;
            else if (!strcmp(a, "-n")) {
                if (!parse_long(v, &n)) return die(2, "-n must be an integer, got '%s'", v);
            } else if (!strcmp(a, "-k")) {
                if (!parse_long(v, &top_k)) return die(2, "-k must be an integer, got '%s'", v);
            } else if (!strcmp(a, "-t")) {
                if (!parse_double(v, &temp)) return die(2, "-t must be a number, got '%s'", v);
            } else if (!strcmp(a, "--top-p")) {
                if (!parse_double(v, &top_p)) return die(2, "--top-p must be a number, got '%s'", v);
            } else if (!parse_u64(v, &seed)) {
                return die(2, "-s must be in [0, 2**64 - 1] = [0, 18446744073709551615], got '%s'", v);
            }
            continue;
        }
        if (a[0] == '-' && a[1]) return die(2, "unknown option '%s' (itl-run --help)", a);
        if (npos == 2) return die(2, "unexpected argument '%s': itl-run takes ARTIFACT TOKENIZER_BIN (itl-run --help)", a);
        pos[npos++] = a;
    }
    if (npos < 2) return die(2, "missing %s (usage: itl-run ARTIFACT TOKENIZER_BIN [options]; itl-run --help)",
                             npos ? "TOKENIZER_BIN" : "ARTIFACT and TOKENIZER_BIN");
    /* the sampling checks of iteralite/train/generate.py's check_sampling, with this program's flags */
    if (n < 0) return die(2, "-n must be >= 0, got %ld", n);
    if (n > MAX_TOKENS) return die(2, "-n must be at most %ld, got %ld", MAX_TOKENS, n);
    if (!isfinite(temp) || temp < 0) return die(2, "-t must be >= 0 (0 = greedy) and finite, got %g", temp);
    if (temp != 0 && !(temp >= TEMP_LO && temp <= TEMP_HI))
        return die(2, "-t must be 0 (greedy) or in [%g, %g], got %g", TEMP_LO, TEMP_HI, temp);
    if (top_k < 0) return die(2, "-k must be >= 0 (0 = no top-k filter), got %ld", top_k);
    if (top_k > 2147483647L) return die(2, "-k must be at most 2147483647, got %ld", top_k);
    if (!(isfinite(top_p) && top_p > 0 && top_p <= 1))
        return die(2, "--top-p must be in (0, 1] (1 = no top-p filter), got %g", top_p);

    char err[1024];
    size_t tlen = 0;
    const char *why = "";
    uint8_t *tbuf = read_file(pos[1], &tlen, &why);
    if (!tbuf) return die(1, "%s: cannot read the tokenizer: %s", pos[1], why);
    itl_tok *tok = NULL;
    int rc = itl_tok_load(tbuf, tlen, &tok);
    free(tbuf);
    if (rc) return die(rc == ITL_TEXT_E_NOMEM ? 1 : 2, "%s: not a usable binary tokenizer: %s", pos[1], itl_text_strerror(rc));
    itl_artifact *art = NULL;
    rc = itl_artifact_load_file(pos[0], &art, err, sizeof err);
    if (rc) {
        itl_tok_free(tok);
        return die(rc == ITL_ART_E_IO || rc == ITL_ART_E_NOMEM ? 1 : 2, "%s", err);
    }
    itl_gen *g = itl_gen_new(itl_artifact_model(art), tok, err, sizeof err);
    if (!g) {
        itl_artifact_free(art);
        itl_tok_free(tok);
        return die(2, "%s: %s", pos[0], err);
    }
    if (exact) itl_gen_set_act(g, ITL_ACT_F32);
    int status = 0;
    double t0 = now_ms();
    rc = itl_gen_start(g, prompt, strlen(prompt), temp, (int)top_k, top_p, (uint64_t)seed);
    double t1 = now_ms();
    if (rc) {
        status = die(2, "%s", itl_gen_error(g));
        goto done;
    }
    if (!ids_only) {
        fputs(prompt, stdout);
        fflush(stdout);
    }
    long made = 0;
    for (; made < n; made++) {
        const char *piece;
        size_t len;
        int32_t id = itl_gen_next(g, &piece, &len);
        if (id < 0) {
            status = die(2, "%s", itl_gen_error(g));
            goto done;
        }
        if (ids_only) {
            printf(made ? " %d" : "%d", (int)id); /* one line, written at the end */
        } else {
            fwrite(piece, 1, len, stdout);
            fflush(stdout);
        }
    }
    double t2 = now_ms();
    if (!ids_only) {
        const char *piece;
        size_t len;
        itl_gen_flush(g, &piece, &len);
        fwrite(piece, 1, len, stdout);
    }
    fputc('\n', stdout);
    if (fflush(stdout) || ferror(stdout)) {
        status = die(1, "cannot write the output");
        goto done;
    }
    double gen_ms = t2 - t1;
    fprintf(stderr, "itl-run: %ld tokens in %.1f ms, %.1f tok/s (prompt %d tokens, %.1f ms)\n", made, gen_ms,
            gen_ms > 0 ? made * 1e3 / gen_ms : 0.0, (int)itl_gen_prompt_tokens(g), t1 - t0);
done:
    itl_gen_free(g);
    itl_artifact_free(art);
    itl_tok_free(tok);
    return status;
}
