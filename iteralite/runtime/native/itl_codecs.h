/* The compact layout's codecs (io/compact.py): how each tensor's bytes are stored in the blob, and
 * the index that lists them. Decoders check every length and count and refuse with one line
 * (itl_rd_fail); they never read outside [data, data + len). Internal to the artifact reader. */
#ifndef ITL_CODECS_H
#define ITL_CODECS_H

#include <stddef.h>
#include <stdint.h>

#include "itl_reader.h"

/* codec ids, as the index stores them (the low 3 bits of an entry) */
enum {
    ITL_CODEC_RAW = 0,  /* the tensor's own bytes (codes bit-packed LSB-first) */
    ITL_CODEC_RANS = 1, /* integer codes, one rANS blob (itl_rans.c) */
    ITL_CODEC_F16 = 2,  /* a float32 tensor stored as fp16 */
    ITL_CODEC_GRID = 3, /* fp16 values as indices into a linear or log grid (io/grid.py) */
    ITL_CODEC_PREV = 4, /* integer codes, one rANS stream per previous code (quant/context.py) */
    ITL_CODEC_ROWS = 5, /* integer codes, one rANS stream per group of rows (quant/context.py) */
    ITL_N_CODECS = 6
};

const char *itl_codec_name(int cid); /* "raw", "rans", ...; cid in [0, ITL_N_CODECS) */

/* The index: canonical base64 of one varint per tensor (length << 3 | codec id), exactly n of them
   -> cids[n], lens[n] (the stored length; 0 where the codec implies it). 0 or a negative code. */
int itl_read_index(itl_rd *r, const char *b64, size_t b64_len, size_t n, int *cids, uint64_t *lens);

/* count integer codes of `bits` bits stored with codec cid (raw, rans, rans-prev, rans-rows) ->
   *codes_out (count bytes, each < 2^bits; the caller frees it). 0 or a negative code. */
int itl_decode_codes(itl_rd *r, const char *name, int cid, const uint8_t *data, size_t len, int bits, int64_t count,
                     uint8_t **codes_out);
/* n fp16 values stored raw / as f16 (2n bytes) or on a grid (len bytes) -> *out (the caller frees
   it); every value finite. 0 or a negative code. */
int itl_decode_half(itl_rd *r, const char *name, int cid, const uint8_t *data, size_t len, int64_t n, uint16_t **out);
/* n raw little-endian float32 values (4n bytes) -> out; every value finite. 0 or a negative code. */
int itl_decode_f32(itl_rd *r, const char *name, const uint8_t *data, int64_t n, float *out);

float itl_half_to_float(uint16_t h);

#endif
