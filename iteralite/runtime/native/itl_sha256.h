/* SHA-256 for the artifact reader's checksums (the header checksum and the compact layout's
 * identity), plus lowercase hex. Internal to the reader: not part of itl_artifact.h. */
#ifndef ITL_SHA256_H
#define ITL_SHA256_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint32_t h[8];
    uint64_t n;
    uint8_t buf[64];
    size_t fill;
} itl_sha256;

void itl_sha256_init(itl_sha256 *s);
void itl_sha256_update(itl_sha256 *s, const void *data, size_t len);
void itl_sha256_final(itl_sha256 *s, uint8_t out[32]);
/* v as 8 little-endian bytes (Python's struct.pack("<Q")) */
void itl_sha256_u64(itl_sha256 *s, uint64_t v);
/* n bytes -> 2n lowercase hex digits and a NUL */
void itl_hex(const uint8_t *d, size_t n, char *out);

#endif
