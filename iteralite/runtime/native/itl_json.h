/* A bounded JSON parser for the artifact reader: the safetensors header and the config and quant
 * config strings inside it. The whole text is parsed into a flat node array (children linked by
 * index) with decoded strings in one pool; it refuses invalid UTF-8, duplicate keys, lone
 * surrogates, nesting deeper than 64, objects of more than 4,096 members and more than 2^20 values.
 * Internal to the reader: not part of itl_artifact.h. */
#ifndef ITL_JSON_H
#define ITL_JSON_H

#include <stddef.h>
#include <stdint.h>

enum { ITL_J_NULL, ITL_J_BOOL, ITL_J_NUM, ITL_J_STR, ITL_J_ARR, ITL_J_OBJ };

typedef struct {
    int type;
    int is_int, big, bval; /* numbers: an integer literal (big: beyond int64) */
    int64_t ival;
    size_t s_off, s_len;   /* strings: the decoded bytes in the pool */
    size_t k_off, k_len;   /* object members: the key */
    int32_t first, next, count; /* containers: first child; siblings */
} itl_jnode;

typedef struct {
    const uint8_t *p;
    size_t n, pos;
    itl_jnode *nodes;
    size_t nn, cap;
    char *pool;
    size_t pn;
    const char *err;
} itl_json;

/* Parse text[0..n) as one JSON value; the root node index, or -1 with j->err set. Free with
   itl_json_free either way (text is not kept). */
int32_t itl_json_parse(itl_json *j, const uint8_t *text, size_t n);
void itl_json_free(itl_json *j);
/* the member `key` of object node obj: its node, or -1 (none, or obj is not an object) */
int32_t itl_json_get(const itl_json *j, int32_t obj, const char *key);
/* node id is the string s */
int itl_json_streq(const itl_json *j, int32_t id, const char *s);
/* node id is an integer literal */
int itl_json_isint(const itl_json *j, int32_t id);

#endif
