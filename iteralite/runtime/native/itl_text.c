/* The text side of the standalone runtime (C99, libc only): the binary tokenizer of
 * iteralite/data/tokbin.py, a byte-level BPE encoder giving exactly the ids of Hugging Face
 * `tokenizers` for iteralite's configuration, decode, and a seeded sampler.
 *
 * Encode follows `tokenizers` step by step:
 *   1. added tokens (<|endoftext|>) are cut out of the raw text first, leftmost-longest; the text
 *      between them is pre-tokenized piece by piece, never across an added token;
 *   2. the ByteLevel pre-tokenizer splits each piece with the GPT-2 regex
 *        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 *      which `pretokenize` implements as a hand-written scanner (the classes come from the
 *      generated range table below; Oniguruma's \s is U+0009..U+000D, U+0085, Zs, Zl, Zp);
 *   3. each pre-token's bytes start as single-byte tokens and the BPE merges the pair of lowest
 *      rank, leftmost first, until no pair has a merge (a heap of candidate pairs, stale entries
 *      skipped when popped: the order of `tokenizers`' Word::merge_all).
 *
 * The sampler is deterministic across platforms: its PRNG is PCG32, its exp is computed here with
 * only IEEE-754 double additions and multiplications (build with -ffp-contract=off so no FMA
 * changes a rounding), and candidates are ordered by (logit descending, id ascending). */
#include "itl_text.h"

#include <stdlib.h>
#include <string.h>

#define ITL_NO_ID 0xFFFFFFFFu
#define ITL_HEADER 28

const char *itl_text_strerror(int code) {
    switch (code) {
    case ITL_TEXT_OK: return "ok";
    case ITL_TEXT_E_NOMEM: return "out of memory";
    case ITL_TEXT_E_MAGIC: return "not an iteralite binary tokenizer (bad magic)";
    case ITL_TEXT_E_VERSION: return "unsupported binary tokenizer version";
    case ITL_TEXT_E_TRUNCATED: return "binary tokenizer is truncated";
    case ITL_TEXT_E_CHECKSUM: return "binary tokenizer is corrupt (CRC-32 mismatch)";
    case ITL_TEXT_E_CORRUPT: return "binary tokenizer is corrupt (inconsistent content)";
    case ITL_TEXT_E_UTF8: return "text is not valid UTF-8";
    case ITL_TEXT_E_ID: return "token id out of range";
    case ITL_TEXT_E_ARG: return "invalid argument";
    case ITL_TEXT_E_LOGITS: return "no finite logit to sample from";
    default: return "unknown error";
    }
}

/* ------------------------------------------------------------------ Unicode classes */

enum { CLS_OTHER = 0, CLS_LETTER = 1, CLS_NUMBER = 2, CLS_SPACE = 3 };

/* BEGIN GENERATED UNICODE TABLE (iteralite/data/gen_unicode_table.py) */
/* Oniguruma of tokenizers 0.23.3: 831 ranges; entry = {first code point, last code point << 2 | class} */
#define ITL_UNI_N 831
static const uint32_t itl_uni[ITL_UNI_N][2] = {
  {0x9,0x37},{0x20,0x83},{0x30,0xE6},{0x41,0x169},{0x61,0x1E9},{0x85,0x217},
  {0xA0,0x283},{0xAA,0x2A9},{0xB2,0x2CE},{0xB5,0x2D5},{0xB9,0x2E6},{0xBA,0x2E9},
  {0xBC,0x2FA},{0xC0,0x359},{0xD8,0x3D9},{0xF8,0xB05},{0x2C6,0xB45},{0x2E0,0xB91},
  {0x2EC,0xBB1},{0x2EE,0xBB9},{0x370,0xDD1},{0x376,0xDDD},{0x37A,0xDF5},{0x37F,0xDFD},
  {0x386,0xE19},{0x388,0xE29},{0x38C,0xE31},{0x38E,0xE85},{0x3A3,0xFD5},{0x3F7,0x1205},
  {0x48A,0x14BD},{0x531,0x1559},{0x559,0x1565},{0x560,0x1621},{0x5D0,0x17A9},{0x5EF,0x17C9},
  {0x620,0x1929},{0x660,0x19A6},{0x66E,0x19BD},{0x671,0x1B4D},{0x6D5,0x1B55},{0x6E5,0x1B99},
  {0x6EE,0x1BBD},{0x6F0,0x1BE6},{0x6FA,0x1BF1},{0x6FF,0x1BFD},{0x710,0x1C41},{0x712,0x1CBD},
  {0x74D,0x1E95},{0x7B1,0x1EC5},{0x7C0,0x1F26},{0x7CA,0x1FA9},{0x7F4,0x1FD5},{0x7FA,0x1FE9},
  {0x800,0x2055},{0x81A,0x2069},{0x824,0x2091},{0x828,0x20A1},{0x840,0x2161},{0x860,0x21A9},
  {0x870,0x221D},{0x889,0x2239},{0x8A0,0x2325},{0x904,0x24E5},{0x93D,0x24F5},{0x950,0x2541},
  {0x958,0x2585},{0x966,0x25BE},{0x971,0x2601},{0x985,0x2631},{0x98F,0x2641},{0x993,0x26A1},
  {0x9AA,0x26C1},{0x9B2,0x26C9},{0x9B6,0x26E5},{0x9BD,0x26F5},{0x9CE,0x2739},{0x9DC,0x2775},
  {0x9DF,0x2785},{0x9E6,0x27BE},{0x9F0,0x27C5},{0x9F4,0x27E6},{0x9FC,0x27F1},{0xA05,0x2829},
  {0xA0F,0x2841},{0xA13,0x28A1},{0xA2A,0x28C1},{0xA32,0x28CD},{0xA35,0x28D9},{0xA38,0x28E5},
  {0xA59,0x2971},{0xA5E,0x2979},{0xA66,0x29BE},{0xA72,0x29D1},{0xA85,0x2A35},{0xA8F,0x2A45},
  {0xA93,0x2AA1},{0xAAA,0x2AC1},{0xAB2,0x2ACD},{0xAB5,0x2AE5},{0xABD,0x2AF5},{0xAD0,0x2B41},
  {0xAE0,0x2B85},{0xAE6,0x2BBE},{0xAF9,0x2BE5},{0xB05,0x2C31},{0xB0F,0x2C41},{0xB13,0x2CA1},
  {0xB2A,0x2CC1},{0xB32,0x2CCD},{0xB35,0x2CE5},{0xB3D,0x2CF5},{0xB5C,0x2D75},{0xB5F,0x2D85},
  {0xB66,0x2DBE},{0xB71,0x2DC5},{0xB72,0x2DDE},{0xB83,0x2E0D},{0xB85,0x2E29},{0xB8E,0x2E41},
  {0xB92,0x2E55},{0xB99,0x2E69},{0xB9C,0x2E71},{0xB9E,0x2E7D},{0xBA3,0x2E91},{0xBA8,0x2EA9},
  {0xBAE,0x2EE5},{0xBD0,0x2F41},{0xBE6,0x2FCA},{0xC05,0x3031},{0xC0E,0x3041},{0xC12,0x30A1},
  {0xC2A,0x30E5},{0xC3D,0x30F5},{0xC58,0x3169},{0xC5D,0x3175},{0xC60,0x3185},{0xC66,0x31BE},
  {0xC78,0x31FA},{0xC80,0x3201},{0xC85,0x3231},{0xC8E,0x3241},{0xC92,0x32A1},{0xCAA,0x32CD},
  {0xCB5,0x32E5},{0xCBD,0x32F5},{0xCDD,0x3379},{0xCE0,0x3385},{0xCE6,0x33BE},{0xCF1,0x33C9},
  {0xD04,0x3431},{0xD0E,0x3441},{0xD12,0x34E9},{0xD3D,0x34F5},{0xD4E,0x3539},{0xD54,0x3559},
  {0xD58,0x357A},{0xD5F,0x3585},{0xD66,0x35E2},{0xD7A,0x35FD},{0xD85,0x3659},{0xD9A,0x36C5},
  {0xDB3,0x36ED},{0xDBD,0x36F5},{0xDC0,0x3719},{0xDE6,0x37BE},{0xE01,0x38C1},{0xE32,0x38CD},
  {0xE40,0x3919},{0xE50,0x3966},{0xE81,0x3A09},{0xE84,0x3A11},{0xE86,0x3A29},{0xE8C,0x3A8D},
  {0xEA5,0x3A95},{0xEA7,0x3AC1},{0xEB2,0x3ACD},{0xEBD,0x3AF5},{0xEC0,0x3B11},{0xEC6,0x3B19},
  {0xED0,0x3B66},{0xEDC,0x3B7D},{0xF00,0x3C01},{0xF20,0x3CCE},{0xF40,0x3D1D},{0xF49,0x3DB1},
  {0xF88,0x3E31},{0x1000,0x40A9},{0x103F,0x40FD},{0x1040,0x4126},{0x1050,0x4155},{0x105A,0x4175},
  {0x1061,0x4185},{0x1065,0x4199},{0x106E,0x41C1},{0x1075,0x4205},{0x108E,0x4239},{0x1090,0x4266},
  {0x10A0,0x4315},{0x10C7,0x431D},{0x10CD,0x4335},{0x10D0,0x43E9},{0x10FC,0x4921},{0x124A,0x4935},
  {0x1250,0x4959},{0x1258,0x4961},{0x125A,0x4975},{0x1260,0x4A21},{0x128A,0x4A35},{0x1290,0x4AC1},
  {0x12B2,0x4AD5},{0x12B8,0x4AF9},{0x12C0,0x4B01},{0x12C2,0x4B15},{0x12C8,0x4B59},{0x12D8,0x4C41},
  {0x1312,0x4C55},{0x1318,0x4D69},{0x1369,0x4DF2},{0x1380,0x4E3D},{0x13A0,0x4FD5},{0x13F8,0x4FF5},
  {0x1401,0x59B1},{0x166F,0x59FD},{0x1680,0x5A03},{0x1681,0x5A69},{0x16A0,0x5BA9},{0x16EE,0x5BC2},
  {0x16F1,0x5BE1},{0x1700,0x5C45},{0x171F,0x5CC5},{0x1740,0x5D45},{0x1760,0x5DB1},{0x176E,0x5DC1},
  {0x1780,0x5ECD},{0x17D7,0x5F5D},{0x17DC,0x5F71},{0x17E0,0x5FA6},{0x17F0,0x5FE6},{0x1810,0x6066},
  {0x1820,0x61E1},{0x1880,0x6211},{0x1887,0x62A1},{0x18AA,0x62A9},{0x18B0,0x63D5},{0x1900,0x6479},
  {0x1946,0x653E},{0x1950,0x65B5},{0x1970,0x65D1},{0x1980,0x66AD},{0x19B0,0x6725},{0x19D0,0x676A},
  {0x1A00,0x6859},{0x1A20,0x6951},{0x1A80,0x6A26},{0x1A90,0x6A66},{0x1AA7,0x6A9D},{0x1B05,0x6CCD},
  {0x1B45,0x6D31},{0x1B50,0x6D66},{0x1B83,0x6E81},{0x1BAE,0x6EBD},{0x1BB0,0x6EE6},{0x1BBA,0x6F95},
  {0x1C00,0x708D},{0x1C40,0x7126},{0x1C4D,0x713D},{0x1C50,0x7166},{0x1C5A,0x71F5},{0x1C80,0x7229},
  {0x1C90,0x72E9},{0x1CBD,0x72FD},{0x1CE9,0x73B1},{0x1CEE,0x73CD},{0x1CF5,0x73D9},{0x1CFA,0x73E9},
  {0x1D00,0x76FD},{0x1E00,0x7C55},{0x1F18,0x7C75},{0x1F20,0x7D15},{0x1F48,0x7D35},{0x1F50,0x7D5D},
  {0x1F59,0x7D65},{0x1F5B,0x7D6D},{0x1F5D,0x7D75},{0x1F5F,0x7DF5},{0x1F80,0x7ED1},{0x1FB6,0x7EF1},
  {0x1FBE,0x7EF9},{0x1FC2,0x7F11},{0x1FC6,0x7F31},{0x1FD0,0x7F4D},{0x1FD6,0x7F6D},{0x1FE0,0x7FB1},
  {0x1FF2,0x7FD1},{0x1FF6,0x7FF1},{0x2000,0x802B},{0x2028,0x80A7},{0x202F,0x80BF},{0x205F,0x817F},
  {0x2070,0x81C2},{0x2071,0x81C5},{0x2074,0x81E6},{0x207F,0x81FD},{0x2080,0x8226},{0x2090,0x8271},
  {0x2102,0x8409},{0x2107,0x841D},{0x210A,0x844D},{0x2115,0x8455},{0x2119,0x8475},{0x2124,0x8491},
  {0x2126,0x8499},{0x2128,0x84A1},{0x212A,0x84B5},{0x212F,0x84E5},{0x213C,0x84FD},{0x2145,0x8525},
  {0x214E,0x8539},{0x2150,0x860A},{0x2183,0x8611},{0x2185,0x8626},{0x2460,0x926E},{0x24EA,0x93FE},
  {0x2776,0x9E4E},{0x2C00,0xB391},{0x2CEB,0xB3B9},{0x2CF2,0xB3CD},{0x2CFD,0xB3F6},{0x2D00,0xB495},
  {0x2D27,0xB49D},{0x2D2D,0xB4B5},{0x2D30,0xB59D},{0x2D6F,0xB5BD},{0x2D80,0xB659},{0x2DA0,0xB699},
  {0x2DA8,0xB6B9},{0x2DB0,0xB6D9},{0x2DB8,0xB6F9},{0x2DC0,0xB719},{0x2DC8,0xB739},{0x2DD0,0xB759},
  {0x2DD8,0xB779},{0x2E2F,0xB8BD},{0x3000,0xC003},{0x3005,0xC019},{0x3007,0xC01E},{0x3021,0xC0A6},
  {0x3031,0xC0D5},{0x3038,0xC0EA},{0x303B,0xC0F1},{0x3041,0xC259},{0x309D,0xC27D},{0x30A1,0xC3E9},
  {0x30FC,0xC3FD},{0x3105,0xC4BD},{0x3131,0xC639},{0x3192,0xC656},{0x31A0,0xC6FD},{0x31F0,0xC7FD},
  {0x3220,0xC8A6},{0x3248,0xC93E},{0x3251,0xC97E},{0x3280,0xCA26},{0x32B1,0xCAFE},{0x3400,0x136FD},
  {0x4E00,0x29231},{0xA4D0,0x293F5},{0xA500,0x29831},{0xA610,0x2987D},{0xA620,0x298A6},{0xA62A,0x298AD},
  {0xA640,0x299B9},{0xA67F,0x29A75},{0xA6A0,0x29B95},{0xA6E6,0x29BBE},{0xA717,0x29C7D},{0xA722,0x29E21},
  {0xA78B,0x29F35},{0xA7D0,0x29F45},{0xA7D3,0x29F4D},{0xA7D5,0x29F71},{0xA7F2,0x2A005},{0xA803,0x2A015},
  {0xA807,0x2A029},{0xA80C,0x2A089},{0xA830,0x2A0D6},{0xA840,0x2A1CD},{0xA882,0x2A2CD},{0xA8D0,0x2A366},
  {0xA8F2,0x2A3DD},{0xA8FB,0x2A3ED},{0xA8FD,0x2A3F9},{0xA900,0x2A426},{0xA90A,0x2A495},{0xA930,0x2A519},
  {0xA960,0x2A5F1},{0xA984,0x2A6C9},{0xA9CF,0x2A73D},{0xA9D0,0x2A766},{0xA9E0,0x2A791},{0xA9E6,0x2A7BD},
  {0xA9F0,0x2A7E6},{0xA9FA,0x2A7F9},{0xAA00,0x2A8A1},{0xAA40,0x2A909},{0xAA44,0x2A92D},{0xAA50,0x2A966},
  {0xAA60,0x2A9D9},{0xAA7A,0x2A9E9},{0xAA7E,0x2AABD},{0xAAB1,0x2AAC5},{0xAAB5,0x2AAD9},{0xAAB9,0x2AAF5},
  {0xAAC0,0x2AB01},{0xAAC2,0x2AB09},{0xAADB,0x2AB75},{0xAAE0,0x2ABA9},{0xAAF2,0x2ABD1},{0xAB01,0x2AC19},
  {0xAB09,0x2AC39},{0xAB11,0x2AC59},{0xAB20,0x2AC99},{0xAB28,0x2ACB9},{0xAB30,0x2AD69},{0xAB5C,0x2ADA5},
  {0xAB70,0x2AF89},{0xABF0,0x2AFE6},{0xAC00,0x35E8D},{0xD7B0,0x35F19},{0xD7CB,0x35FED},{0xF900,0x3E9B5},
  {0xFA70,0x3EB65},{0xFB00,0x3EC19},{0xFB13,0x3EC5D},{0xFB1D,0x3EC75},{0xFB1F,0x3ECA1},{0xFB2A,0x3ECD9},
  {0xFB38,0x3ECF1},{0xFB3E,0x3ECF9},{0xFB40,0x3ED05},{0xFB43,0x3ED11},{0xFB46,0x3EEC5},{0xFBD3,0x3F4F5},
  {0xFD50,0x3F63D},{0xFD92,0x3F71D},{0xFDF0,0x3F7ED},{0xFE70,0x3F9D1},{0xFE76,0x3FBF1},{0xFF10,0x3FC66},
  {0xFF21,0x3FCE9},{0xFF41,0x3FD69},{0xFF66,0x3FEF9},{0xFFC2,0x3FF1D},{0xFFCA,0x3FF3D},{0xFFD2,0x3FF5D},
  {0xFFDA,0x3FF71},{0x10000,0x4002D},{0x1000D,0x40099},{0x10028,0x400E9},{0x1003C,0x400F5},{0x1003F,0x40135},
  {0x10050,0x40175},{0x10080,0x403E9},{0x10107,0x404CE},{0x10140,0x405E2},{0x1018A,0x4062E},{0x10280,0x40A71},
  {0x102A0,0x40B41},{0x102E1,0x40BEE},{0x10300,0x40C7D},{0x10320,0x40C8E},{0x1032D,0x40D01},{0x10341,0x40D06},
  {0x10342,0x40D25},{0x1034A,0x40D2A},{0x10350,0x40DD5},{0x10380,0x40E75},{0x103A0,0x40F0D},{0x103C8,0x40F3D},
  {0x103D1,0x40F56},{0x10400,0x41275},{0x104A0,0x412A6},{0x104B0,0x4134D},{0x104D8,0x413ED},{0x10500,0x4149D},
  {0x10530,0x4158D},{0x10570,0x415E9},{0x1057C,0x41629},{0x1058C,0x41649},{0x10594,0x41655},{0x10597,0x41685},
  {0x105A3,0x416C5},{0x105B3,0x416E5},{0x105BB,0x416F1},{0x105C0,0x417CD},{0x10600,0x41CD9},{0x10740,0x41D55},
  {0x10760,0x41D9D},{0x10780,0x41E15},{0x10787,0x41EC1},{0x107B2,0x41EE9},{0x10800,0x42015},{0x10808,0x42021},
  {0x1080A,0x420D5},{0x10837,0x420E1},{0x1083C,0x420F1},{0x1083F,0x42155},{0x10858,0x4217E},{0x10860,0x421D9},
  {0x10879,0x421FE},{0x10880,0x42279},{0x108A7,0x422BE},{0x108E0,0x423C9},{0x108F4,0x423D5},{0x108FB,0x423FE},
  {0x10900,0x42455},{0x10916,0x4246E},{0x10920,0x424E5},{0x10980,0x426DD},{0x109BC,0x426F6},{0x109BE,0x426FD},
  {0x109C0,0x4273E},{0x109D2,0x427FE},{0x10A00,0x42801},{0x10A10,0x4284D},{0x10A15,0x4285D},{0x10A19,0x428D5},
  {0x10A40,0x42922},{0x10A60,0x429F1},{0x10A7D,0x429FA},{0x10A80,0x42A71},{0x10A9D,0x42A7E},{0x10AC0,0x42B1D},
  {0x10AC9,0x42B91},{0x10AEB,0x42BBE},{0x10B00,0x42CD5},{0x10B40,0x42D55},{0x10B58,0x42D7E},{0x10B60,0x42DC9},
  {0x10B78,0x42DFE},{0x10B80,0x42E45},{0x10BA9,0x42EBE},{0x10C00,0x43121},{0x10C80,0x432C9},{0x10CC0,0x433C9},
  {0x10CFA,0x433FE},{0x10D00,0x4348D},{0x10D30,0x434E6},{0x10D40,0x43526},{0x10D4A,0x43595},{0x10D6F,0x43615},
  {0x10E60,0x439FA},{0x10E80,0x43AA5},{0x10EB0,0x43AC5},{0x10EC2,0x43B11},{0x10F00,0x43C71},{0x10F1D,0x43C9A},
  {0x10F27,0x43C9D},{0x10F30,0x43D15},{0x10F51,0x43D52},{0x10F70,0x43E05},{0x10FB0,0x43F11},{0x10FC5,0x43F2E},
  {0x10FE0,0x43FD9},{0x11003,0x440DD},{0x11052,0x441BE},{0x11071,0x441C9},{0x11075,0x441D5},{0x11083,0x442BD},
  {0x110D0,0x443A1},{0x110F0,0x443E6},{0x11103,0x44499},{0x11136,0x444FE},{0x11144,0x44511},{0x11147,0x4451D},
  {0x11150,0x445C9},{0x11176,0x445D9},{0x11183,0x446C9},{0x111C1,0x44711},{0x111D0,0x44766},{0x111DA,0x44769},
  {0x111DC,0x44771},{0x111E1,0x447D2},{0x11200,0x44845},{0x11213,0x448AD},{0x1123F,0x44901},{0x11280,0x44A19},
  {0x11288,0x44A21},{0x1128A,0x44A35},{0x1128F,0x44A75},{0x1129F,0x44AA1},{0x112B0,0x44B79},{0x112F0,0x44BE6},
  {0x11305,0x44C31},{0x1130F,0x44C41},{0x11313,0x44CA1},{0x1132A,0x44CC1},{0x11332,0x44CCD},{0x11335,0x44CE5},
  {0x1133D,0x44CF5},{0x11350,0x44D41},{0x1135D,0x44D85},{0x11380,0x44E25},{0x1138B,0x44E2D},{0x1138E,0x44E39},
  {0x11390,0x44ED5},{0x113B7,0x44EDD},{0x113D1,0x44F45},{0x113D3,0x44F4D},{0x11400,0x450D1},{0x11447,0x45129},
  {0x11450,0x45166},{0x1145F,0x45185},{0x11480,0x452BD},{0x114C4,0x45315},{0x114C7,0x4531D},{0x114D0,0x45366},
  {0x11580,0x456B9},{0x115D8,0x4576D},{0x11600,0x458BD},{0x11644,0x45911},{0x11650,0x45966},{0x11680,0x45AA9},
  {0x116B8,0x45AE1},{0x116C0,0x45B26},{0x116D0,0x45B8E},{0x11700,0x45C69},{0x11730,0x45CEE},{0x11740,0x45D19},
  {0x11800,0x460AD},{0x118A0,0x4637D},{0x118E0,0x463CA},{0x118FF,0x46419},{0x11909,0x46425},{0x1190C,0x4644D},
  {0x11915,0x46459},{0x11918,0x464BD},{0x1193F,0x464FD},{0x11941,0x46505},{0x11950,0x46566},{0x119A0,0x4669D},
  {0x119AA,0x46741},{0x119E1,0x46785},{0x119E3,0x4678D},{0x11A00,0x46801},{0x11A0B,0x468C9},{0x11A3A,0x468E9},
  {0x11A50,0x46941},{0x11A5C,0x46A25},{0x11A9D,0x46A75},{0x11AB0,0x46BE1},{0x11BC0,0x46F81},{0x11BF0,0x46FE6},
  {0x11C00,0x47021},{0x11C0A,0x470B9},{0x11C40,0x47101},{0x11C50,0x471B2},{0x11C72,0x4723D},{0x11D00,0x47419},
  {0x11D08,0x47425},{0x11D0B,0x474C1},{0x11D46,0x47519},{0x11D50,0x47566},{0x11D60,0x47595},{0x11D67,0x475A1},
  {0x11D6A,0x47625},{0x11D98,0x47661},{0x11DA0,0x476A6},{0x11EE0,0x47BC9},{0x11F02,0x47C09},{0x11F04,0x47C41},
  {0x11F12,0x47CCD},{0x11F50,0x47D66},{0x11FB0,0x47EC1},{0x11FC0,0x47F52},{0x12000,0x48E65},{0x12400,0x491BA},
  {0x12480,0x4950D},{0x12F90,0x4BFC1},{0x13000,0x4D0BD},{0x13441,0x4D119},{0x13460,0x50FE9},{0x14400,0x51919},
  {0x16100,0x58475},{0x16130,0x584E6},{0x16800,0x5A8E1},{0x16A40,0x5A979},{0x16A60,0x5A9A6},{0x16A70,0x5AAF9},
  {0x16AC0,0x5AB26},{0x16AD0,0x5ABB5},{0x16B00,0x5ACBD},{0x16B40,0x5AD0D},{0x16B50,0x5AD66},{0x16B5B,0x5AD86},
  {0x16B63,0x5ADDD},{0x16B7D,0x5AE3D},{0x16D40,0x5B5B1},{0x16D70,0x5B5E6},{0x16E40,0x5B9FD},{0x16E80,0x5BA5A},
  {0x16F00,0x5BD29},{0x16F50,0x5BD41},{0x16F93,0x5BE7D},{0x16FE0,0x5BF85},{0x16FE3,0x5BF8D},{0x17000,0x61FDD},
  {0x18800,0x63355},{0x18CFF,0x63421},{0x1AFF0,0x6BFCD},{0x1AFF5,0x6BFED},{0x1AFFD,0x6BFF9},{0x1B000,0x6C489},
  {0x1B132,0x6C4C9},{0x1B150,0x6C549},{0x1B155,0x6C555},{0x1B164,0x6C59D},{0x1B170,0x6CBED},{0x1BC00,0x6F1A9},
  {0x1BC70,0x6F1F1},{0x1BC80,0x6F221},{0x1BC90,0x6F265},{0x1CCF0,0x733E6},{0x1D2C0,0x74B4E},{0x1D2E0,0x74BCE},
  {0x1D360,0x74DE2},{0x1D400,0x75151},{0x1D456,0x75271},{0x1D49E,0x7527D},{0x1D4A2,0x75289},{0x1D4A5,0x75299},
  {0x1D4A9,0x752B1},{0x1D4AE,0x752E5},{0x1D4BB,0x752ED},{0x1D4BD,0x7530D},{0x1D4C5,0x75415},{0x1D507,0x75429},
  {0x1D50D,0x75451},{0x1D516,0x75471},{0x1D51E,0x754E5},{0x1D53B,0x754F9},{0x1D540,0x75511},{0x1D546,0x75519},
  {0x1D54A,0x75541},{0x1D552,0x75A95},{0x1D6A8,0x75B01},{0x1D6C2,0x75B69},{0x1D6DC,0x75BE9},{0x1D6FC,0x75C51},
  {0x1D716,0x75CD1},{0x1D736,0x75D39},{0x1D750,0x75DB9},{0x1D770,0x75E21},{0x1D78A,0x75EA1},{0x1D7AA,0x75F09},
  {0x1D7C4,0x75F2D},{0x1D7CE,0x75FFE},{0x1DF00,0x77C79},{0x1DF25,0x77CA9},{0x1E030,0x781B5},{0x1E100,0x784B1},
  {0x1E137,0x784F5},{0x1E140,0x78526},{0x1E14E,0x78539},{0x1E290,0x78AB5},{0x1E2C0,0x78BAD},{0x1E2F0,0x78BE6},
  {0x1E4D0,0x793AD},{0x1E4F0,0x793E6},{0x1E5D0,0x797B5},{0x1E5F0,0x797C1},{0x1E5F1,0x797EA},{0x1E7E0,0x79F99},
  {0x1E7E8,0x79FAD},{0x1E7ED,0x79FB9},{0x1E7F0,0x79FF9},{0x1E800,0x7A311},{0x1E8C7,0x7A33E},{0x1E900,0x7A50D},
  {0x1E94B,0x7A52D},{0x1E950,0x7A566},{0x1EC71,0x7B2AE},{0x1ECAD,0x7B2BE},{0x1ECB1,0x7B2D2},{0x1ED01,0x7B4B6},
  {0x1ED2F,0x7B4F6},{0x1EE00,0x7B80D},{0x1EE05,0x7B87D},{0x1EE21,0x7B889},{0x1EE24,0x7B891},{0x1EE27,0x7B89D},
  {0x1EE29,0x7B8C9},{0x1EE34,0x7B8DD},{0x1EE39,0x7B8E5},{0x1EE3B,0x7B8ED},{0x1EE42,0x7B909},{0x1EE47,0x7B91D},
  {0x1EE49,0x7B925},{0x1EE4B,0x7B92D},{0x1EE4D,0x7B93D},{0x1EE51,0x7B949},{0x1EE54,0x7B951},{0x1EE57,0x7B95D},
  {0x1EE59,0x7B965},{0x1EE5B,0x7B96D},{0x1EE5D,0x7B975},{0x1EE5F,0x7B97D},{0x1EE61,0x7B989},{0x1EE64,0x7B991},
  {0x1EE67,0x7B9A9},{0x1EE6C,0x7B9C9},{0x1EE74,0x7B9DD},{0x1EE79,0x7B9F1},{0x1EE7E,0x7B9F9},{0x1EE80,0x7BA25},
  {0x1EE8B,0x7BA6D},{0x1EEA1,0x7BA8D},{0x1EEA5,0x7BAA5},{0x1EEAB,0x7BAED},{0x1F100,0x7C432},{0x1FBF0,0x7EFE6},
  {0x20000,0xA9B7D},{0x2A700,0xADCE5},{0x2B740,0xAE075},{0x2B820,0xB3A85},{0x2CEB0,0xBAF81},{0x2EBF0,0xBB975},
  {0x2F800,0xBE875},{0x30000,0xC4D29},{0x31350,0xC8EBD},
};
/* END GENERATED UNICODE TABLE */

static int uni_class(uint32_t cp) {
    size_t lo = 0, hi = ITL_UNI_N; /* find the last range starting at or before cp */
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (itl_uni[mid][0] <= cp) lo = mid + 1;
        else hi = mid;
    }
    if (lo == 0) return CLS_OTHER;
    if (cp <= (itl_uni[lo - 1][1] >> 2)) return (int)(itl_uni[lo - 1][1] & 3u);
    return CLS_OTHER;
}

int64_t itl_text_char_classes(uint32_t first, uint32_t n, uint8_t *out) {
    if ((!out && n) || first > 0x10FFFFu || n > 0x110000u - first) return ITL_TEXT_E_ARG;
    for (uint32_t i = 0; i < n; i++) out[i] = (uint8_t)uni_class(first + i);
    return (int64_t)n;
}

/* Length of the valid UTF-8 sequence at s[0..n) and its code point, or 0 if invalid (overlong,
 * surrogate, above U+10FFFF, truncated) — the strings `tokenizers` can receive. */
static size_t utf8_next(const uint8_t *s, size_t n, uint32_t *cp) {
    uint8_t c = s[0];
    if (c < 0x80) { *cp = c; return 1; }
    if (c < 0xC2) return 0;
    if (c < 0xE0) {
        if (n < 2 || (s[1] & 0xC0) != 0x80) return 0;
        *cp = ((uint32_t)(c & 0x1F) << 6) | (s[1] & 0x3F);
        return 2;
    }
    if (c < 0xF0) {
        if (n < 3 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80) return 0;
        uint32_t v = ((uint32_t)(c & 0x0F) << 12) | ((uint32_t)(s[1] & 0x3F) << 6) | (s[2] & 0x3F);
        if (v < 0x800 || (v >= 0xD800 && v <= 0xDFFF)) return 0;
        *cp = v;
        return 3;
    }
    if (c < 0xF5) {
        if (n < 4 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80 || (s[3] & 0xC0) != 0x80) return 0;
        uint32_t v = ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(s[1] & 0x3F) << 12) |
                     ((uint32_t)(s[2] & 0x3F) << 6) | (s[3] & 0x3F);
        if (v < 0x10000 || v > 0x10FFFF) return 0;
        *cp = v;
        return 4;
    }
    return 0;
}

/* ------------------------------------------------------------------ tokenizer file */

struct itl_tok {
    int32_t vocab, eot, n_added;
    uint32_t *off;   /* vocab + 1 offsets into blob */
    uint8_t *blob;   /* every token's bytes */
    int32_t *added;  /* ids of the added tokens */
    int32_t byte_id[256];
    uint32_t hmask;  /* merge table: open addressing, capacity hmask + 1 */
    uint32_t *hkey;  /* left << 16 | right */
    int32_t *hrank;  /* -1: empty slot */
    int32_t *hnew;
};

static uint32_t rd_u32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static uint32_t crc32_ieee(const uint8_t *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
    }
    return c ^ 0xFFFFFFFFu;
}

/* A strict LEB128 varint of at most 5 bytes at p[*pos..end): -1 if truncated or over-long. */
static int rd_varint(const uint8_t *p, size_t *pos, size_t end, uint64_t *v) {
    uint64_t out = 0;
    for (int i = 0; i < 5; i++) {
        if (*pos >= end) return -1;
        uint8_t b = p[(*pos)++];
        out |= (uint64_t)(b & 0x7F) << (7 * i);
        if (!(b & 0x80)) {
            if (b == 0 && i > 0) return -1;
            *v = out;
            return 0;
        }
    }
    return -1;
}

static uint32_t hash_key(uint32_t key) { return (key * 0x9E3779B1u) ^ (key >> 15); }

static int merge_find(const itl_tok *t, int32_t left, int32_t right, int32_t *rank, int32_t *newid) {
    uint32_t key = ((uint32_t)left << 16) | (uint32_t)right;
    for (uint32_t h = hash_key(key) & t->hmask;; h = (h + 1) & t->hmask) {
        if (t->hrank[h] < 0) return 0;
        if (t->hkey[h] == key) {
            *rank = t->hrank[h];
            *newid = t->hnew[h];
            return 1;
        }
    }
}

static void merge_put(itl_tok *t, uint32_t key, int32_t rank, int32_t newid) {
    uint32_t h = hash_key(key) & t->hmask;
    while (t->hrank[h] >= 0 && t->hkey[h] != key) h = (h + 1) & t->hmask;
    t->hkey[h] = key; /* a repeated pair keeps its last rank, as `tokenizers`' map does */
    t->hrank[h] = rank;
    t->hnew[h] = newid;
}

void itl_tok_free(itl_tok *t) {
    if (!t) return;
    free(t->off);
    free(t->blob);
    free(t->added);
    free(t->hkey);
    free(t->hrank);
    free(t->hnew);
    free(t);
}

static int tok_parse(itl_tok *t, const uint8_t *buf, size_t len) {
    uint32_t total = rd_u32(buf + 8), V = rd_u32(buf + 12), M = rd_u32(buf + 16), A = rd_u32(buf + 20);
    uint32_t eot = rd_u32(buf + 24);
    if (len < total) return ITL_TEXT_E_TRUNCATED;
    if (len > total) return ITL_TEXT_E_CORRUPT;
    if (crc32_ieee(buf, len - 4) != rd_u32(buf + len - 4)) return ITL_TEXT_E_CHECKSUM;
    size_t end = len - 4, pos = ITL_HEADER;
    if (V == 0 || V > 65536 || (eot != ITL_NO_ID && eot >= V)) return ITL_TEXT_E_CORRUPT;
    if (A > V || M > end / 5) return ITL_TEXT_E_CORRUPT;
    t->vocab = (int32_t)V;
    t->eot = eot == ITL_NO_ID ? -1 : (int32_t)eot;
    t->off = malloc(sizeof(uint32_t) * (V + 1));
    t->blob = malloc(end - pos + 1);
    t->added = malloc(sizeof(int32_t) * (A + 1));
    uint32_t cap = 16;
    while (cap < 2 * M + 2) cap <<= 1;
    t->hmask = cap - 1;
    t->hkey = malloc(sizeof(uint32_t) * cap);
    t->hrank = malloc(sizeof(int32_t) * cap);
    t->hnew = malloc(sizeof(int32_t) * cap);
    if (!t->off || !t->blob || !t->added || !t->hkey || !t->hrank || !t->hnew) return ITL_TEXT_E_NOMEM;
    for (uint32_t h = 0; h < cap; h++) t->hrank[h] = -1;

    uint32_t blob_len = 0;
    for (uint32_t i = 0; i < V; i++) {
        uint64_t n;
        if (rd_varint(buf, &pos, end, &n) || n > end - pos) return ITL_TEXT_E_CORRUPT;
        t->off[i] = blob_len;
        memcpy(t->blob + blob_len, buf + pos, (size_t)n);
        blob_len += (uint32_t)n;
        pos += (size_t)n;
    }
    t->off[V] = blob_len;
    for (int b = 0; b < 256; b++) t->byte_id[b] = -1;
    for (uint32_t i = 0; i < V; i++)
        if (t->off[i + 1] - t->off[i] == 1 && t->byte_id[t->blob[t->off[i]]] < 0) t->byte_id[t->blob[t->off[i]]] = (int32_t)i;
    for (int b = 0; b < 256; b++)
        if (t->byte_id[b] < 0) return ITL_TEXT_E_CORRUPT;

    for (uint32_t a = 0; a < A; a++) {
        if (end - pos < 5) return ITL_TEXT_E_CORRUPT;
        uint32_t id = rd_u32(buf + pos);
        pos += 5;
        if (id >= V || t->off[id + 1] == t->off[id]) return ITL_TEXT_E_CORRUPT;
        t->added[a] = (int32_t)id;
    }
    t->n_added = (int32_t)A;

    int64_t prev = -1;
    for (uint32_t r = 0; r < M; r++) {
        uint64_t z;
        if (end - pos < 4) return ITL_TEXT_E_CORRUPT;
        uint32_t left = (uint32_t)buf[pos] | ((uint32_t)buf[pos + 1] << 8);
        uint32_t right = (uint32_t)buf[pos + 2] | ((uint32_t)buf[pos + 3] << 8);
        pos += 4;
        if (rd_varint(buf, &pos, end, &z)) return ITL_TEXT_E_CORRUPT;
        int64_t delta = (z & 1) ? -(int64_t)((z + 1) >> 1) : (int64_t)(z >> 1);
        int64_t nw = prev + 1 + delta;
        if (left >= V || right >= V || nw < 0 || nw >= (int64_t)V) return ITL_TEXT_E_CORRUPT;
        uint32_t ll = t->off[left + 1] - t->off[left], rl = t->off[right + 1] - t->off[right];
        uint32_t nl = t->off[nw + 1] - t->off[nw];
        if (nl != ll + rl || memcmp(t->blob + t->off[nw], t->blob + t->off[left], ll) ||
            memcmp(t->blob + t->off[nw] + ll, t->blob + t->off[right], rl))
            return ITL_TEXT_E_CORRUPT;
        merge_put(t, (left << 16) | right, (int32_t)r, (int32_t)nw);
        prev = nw;
    }
    if (pos != end) return ITL_TEXT_E_CORRUPT;
    return ITL_TEXT_OK;
}

int itl_tok_load(const uint8_t *buf, size_t len, itl_tok **out) {
    if (!out) return ITL_TEXT_E_ARG;
    *out = NULL;
    if (!buf && len) return ITL_TEXT_E_ARG;
    if (len < 4 || memcmp(buf, "ITLT", 4) != 0) return ITL_TEXT_E_MAGIC;
    if (len < 6) return ITL_TEXT_E_TRUNCATED;
    if (((uint32_t)buf[4] | ((uint32_t)buf[5] << 8)) != 1) return ITL_TEXT_E_VERSION;
    if (len < ITL_HEADER + 4) return ITL_TEXT_E_TRUNCATED;
    itl_tok *t = calloc(1, sizeof(itl_tok));
    if (!t) return ITL_TEXT_E_NOMEM;
    int rc = tok_parse(t, buf, len);
    if (rc) {
        itl_tok_free(t);
        return rc;
    }
    *out = t;
    return ITL_TEXT_OK;
}

int32_t itl_tok_vocab_size(const itl_tok *t) { return t ? t->vocab : ITL_TEXT_E_ARG; }
int32_t itl_tok_eot_id(const itl_tok *t) { return t ? t->eot : ITL_TEXT_E_ARG; }

/* ------------------------------------------------------------------ encode */

typedef struct { int32_t rank, pos, newid; } cand;

typedef struct {
    const itl_tok *t;
    const uint8_t *text;
    uint8_t *cls;     /* class of the character starting at each byte */
    int32_t *ids;     /* caller's output */
    size_t cap, count;
    size_t scap;      /* capacity of the BPE scratch below, in symbols */
    int32_t *sid, *prv, *nxt;
    cand *heap;
    size_t nheap;
} enc_ctx;

static void emit(enc_ctx *c, int32_t id) {
    if (c->count < c->cap) c->ids[c->count] = id;
    c->count++;
}

static int cand_less(const cand *a, const cand *b) {
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void heap_push(enc_ctx *c, cand x) {
    size_t i = c->nheap++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!cand_less(&x, &c->heap[p])) break;
        c->heap[i] = c->heap[p];
        i = p;
    }
    c->heap[i] = x;
}

static cand heap_pop(enc_ctx *c) {
    cand top = c->heap[0], last = c->heap[--c->nheap];
    size_t i = 0, n = c->nheap;
    for (;;) {
        size_t l = 2 * i + 1, m = i;
        const cand *best = &last;
        if (l < n && cand_less(&c->heap[l], best)) { m = l; best = &c->heap[l]; }
        if (l + 1 < n && cand_less(&c->heap[l + 1], best)) m = l + 1;
        if (m == i) break;
        c->heap[i] = c->heap[m];
        i = m;
    }
    if (n) c->heap[i] = last;
    return top;
}

static void push_pair(enc_ctx *c, int32_t pos, int32_t next) {
    int32_t rank, nw;
    if (merge_find(c->t, c->sid[pos], c->sid[next], &rank, &nw)) {
        cand x = {rank, pos, nw};
        heap_push(c, x);
    }
}

/* BPE of one pre-token, the bytes text[a..b). */
static int bpe(enc_ctx *c, size_t a, size_t b) {
    size_t n = b - a;
    if (n == 1) {
        emit(c, c->t->byte_id[c->text[a]]);
        return ITL_TEXT_OK;
    }
    if (n > c->scap) {
        size_t cap = c->scap ? c->scap : 64;
        while (cap < n) cap *= 2;
        if (cap > (size_t)INT32_MAX) return ITL_TEXT_E_NOMEM;
        int32_t *sid = realloc(c->sid, cap * sizeof(int32_t));
        if (sid) c->sid = sid;
        int32_t *prv = realloc(c->prv, cap * sizeof(int32_t));
        if (prv) c->prv = prv;
        int32_t *nxt = realloc(c->nxt, cap * sizeof(int32_t));
        if (nxt) c->nxt = nxt;
        cand *heap = realloc(c->heap, 3 * cap * sizeof(cand));
        if (heap) c->heap = heap;
        if (!sid || !prv || !nxt || !heap) return ITL_TEXT_E_NOMEM;
        c->scap = cap;
    }
    for (size_t i = 0; i < n; i++) {
        c->sid[i] = c->t->byte_id[c->text[a + i]];
        c->prv[i] = (int32_t)i - 1;
        c->nxt[i] = i + 1 < n ? (int32_t)i + 1 : -1;
    }
    c->nheap = 0;
    for (size_t i = 0; i + 1 < n; i++) push_pair(c, (int32_t)i, (int32_t)i + 1);
    while (c->nheap) {
        cand top = heap_pop(c);
        int32_t pos = top.pos, nx, rank, nw;
        if (c->sid[pos] < 0 || (nx = c->nxt[pos]) < 0) continue;
        if (!merge_find(c->t, c->sid[pos], c->sid[nx], &rank, &nw) || nw != top.newid) continue;
        c->sid[pos] = top.newid;
        c->sid[nx] = -1;
        c->nxt[pos] = c->nxt[nx];
        if (c->nxt[nx] >= 0) c->prv[c->nxt[nx]] = pos;
        if (c->prv[pos] >= 0) push_pair(c, c->prv[pos], pos);
        if (c->nxt[pos] >= 0) push_pair(c, pos, c->nxt[pos]);
    }
    for (int32_t i = 0; i >= 0; i = c->nxt[i]) emit(c, c->sid[i]);
    return ITL_TEXT_OK;
}

static size_t char_len(uint8_t lead) { return lead < 0x80 ? 1 : lead < 0xE0 ? 2 : lead < 0xF0 ? 3 : 4; }

/* End (byte offset) of the run of characters of class k starting at p, within [p, e). */
static size_t run_end(const enc_ctx *c, size_t p, size_t e, int k) {
    while (p < e && c->cls[p] == k) p += char_len(c->text[p]);
    return p;
}

/* The GPT-2 regex over text[s..e) (see the file comment), each piece through the BPE. */
static int pretokenize(enc_ctx *c, size_t s, size_t e) {
    const uint8_t *x = c->text;
    size_t p = s;
    while (p < e) {
        size_t q;
        int k = c->cls[p];
        if (x[p] == '\'' && p + 1 < e &&
            (x[p + 1] == 's' || x[p + 1] == 't' || x[p + 1] == 'm' || x[p + 1] == 'd')) {
            q = p + 2;
        } else if (x[p] == '\'' && p + 2 < e &&
                   ((x[p + 1] == 'r' && x[p + 2] == 'e') || (x[p + 1] == 'v' && x[p + 2] == 'e') ||
                    (x[p + 1] == 'l' && x[p + 2] == 'l'))) {
            q = p + 3;
        } else if (x[p] == ' ' && p + 1 < e && c->cls[p + 1] != CLS_SPACE) {
            q = run_end(c, p + 1, e, c->cls[p + 1]); /* ' ?\p{L}+', ' ?\p{N}+' or ' ?[^\s\p{L}\p{N}]+' */
        } else if (k != CLS_SPACE) {
            q = run_end(c, p, e, k);
        } else {
            q = run_end(c, p, e, CLS_SPACE);
            if (q < e) { /* '\s+(?!\S)' leaves the last space to the word after it */
                size_t last = p, i = p;
                while (i < q) { last = i; i += char_len(x[i]); }
                if (last > p) q = last;
            }
        }
        int rc = bpe(c, p, q);
        if (rc) return rc;
        p = q;
    }
    return ITL_TEXT_OK;
}

int64_t itl_tok_encode(const itl_tok *t, const uint8_t *text, size_t len, int32_t *ids, size_t cap) {
    if (!t || (!text && len) || (!ids && cap)) return ITL_TEXT_E_ARG;
    if (len > (size_t)INT32_MAX) return ITL_TEXT_E_ARG;
    enc_ctx c;
    memset(&c, 0, sizeof c);
    c.t = t;
    c.text = text;
    c.ids = ids;
    c.cap = cap;
    if (len == 0) return 0;
    c.cls = malloc(len);
    if (!c.cls) return ITL_TEXT_E_NOMEM;
    for (size_t p = 0; p < len;) {
        uint32_t cp;
        size_t n = utf8_next(text + p, len - p, &cp);
        if (!n) {
            free(c.cls);
            return ITL_TEXT_E_UTF8;
        }
        c.cls[p] = (uint8_t)uni_class(cp);
        p += n;
    }
    int rc = ITL_TEXT_OK;
    size_t seg = 0, p = 0;
    while (p < len && rc == ITL_TEXT_OK) {
        int32_t best = -1;
        size_t best_len = 0;
        for (int32_t a = 0; a < t->n_added; a++) {
            int32_t id = t->added[a];
            size_t n = t->off[id + 1] - t->off[id];
            const uint8_t *tb = t->blob + t->off[id];
            if (n > best_len && n <= len - p && tb[0] == text[p] && memcmp(tb, text + p, n) == 0) {
                best = id;
                best_len = n;
            }
        }
        if (best < 0) {
            p++;
            continue;
        }
        rc = pretokenize(&c, seg, p);
        emit(&c, best);
        p += best_len;
        seg = p;
    }
    if (rc == ITL_TEXT_OK) rc = pretokenize(&c, seg, len);
    free(c.cls);
    free(c.sid);
    free(c.prv);
    free(c.nxt);
    free(c.heap);
    return rc ? rc : (int64_t)c.count;
}

int64_t itl_tok_decode(const itl_tok *t, const int32_t *ids, size_t n, uint8_t *out, size_t cap) {
    if (!t || (!ids && n) || (!out && cap)) return ITL_TEXT_E_ARG;
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= t->vocab) return ITL_TEXT_E_ID;
        size_t len = t->off[ids[i] + 1] - t->off[ids[i]];
        if (total < cap) memcpy(out + total, t->blob + t->off[ids[i]], len <= cap - total ? len : cap - total);
        total += len;
    }
    return (int64_t)total;
}

/* ------------------------------------------------------------------ sampler */

/* The draw is defined by the straightforward algorithm (sample_full below): the finite logits
 * sorted by (logit descending, id ascending), cut to top_k, weights det_exp((l - max) / T) summed in
 * that order, the smallest prefix whose running sum reaches top_p of the total, then the first id
 * whose running sum exceeds uniform * (the prefix's sum). Sorting and weighing every id is slow, so
 * itl_sampler_sample mostly takes a shorter path with the same result: it bounds the total from
 * cheap approximate weights (with a proven error bound), sorts and weighs exactly only the few
 * largest logits, and returns early only when every total inside the bounds leads to the same id;
 * otherwise it runs sample_full. */

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(ITL_TEXT_NO_AVX2)
#define ITL_TEXT_AVX2 1 /* AVX2 copies of the vectorized loops, chosen at run time */
#include <immintrin.h>
#endif

#if defined(__GNUC__)
#define ITL_INLINE static inline __attribute__((always_inline)) /* into each target's copy of a loop */
#define ITL_CTZ(x) __builtin_ctz(x)
#else
#define ITL_INLINE static inline
static int itl_ctz(unsigned x) {
    int q = 0;
    while (!(x & 1u)) x >>= 1, q++;
    return q;
}
#define ITL_CTZ(x) itl_ctz(x)
#endif

#if defined(__GNUC__) && !defined(__clang__)
/* lets GCC vectorize the loops' selects; changes no value */
#define ITL_VECTORIZE __attribute__((optimize("no-trapping-math")))
#else
#define ITL_VECTORIZE
#endif

struct itl_sampler {
    uint64_t state, inc;
    double temperature, top_p;
    int32_t top_k, cap;
    int avx2; /* the CPU has AVX2 */
    uint64_t *key, *tmp; /* sort keys (sort_key) */
    double *w;           /* exact weights of the sorted prefix */
    float *aw;           /* approximate weights of all ids (n), then weight * -x (n) */
};

static uint32_t pcg32(itl_sampler *s) {
    uint64_t old = s->state;
    s->state = old * 6364136223846793005ULL + s->inc;
    uint32_t xs = (uint32_t)(((old >> 18) ^ old) >> 27), rot = (uint32_t)(old >> 59);
    return (xs >> rot) | (xs << ((32u - rot) & 31u));
}

uint32_t itl_sampler_next_u32(itl_sampler *s) { return s ? pcg32(s) : 0; }

/* Uniform in [0, 1) with 53 random bits. */
static double uniform(itl_sampler *s) {
    uint64_t a = pcg32(s) >> 5, b = pcg32(s) >> 6;
    return (double)((a << 26) | b) * (1.0 / 9007199254740992.0);
}

static int finite_f(float v) { return v == v && v - v == 0.0f; }

/* exp(x) for x <= 0 from additions and multiplications only (bit-identical on IEEE-754
 * platforms): x = k ln2 + r, |r| <= ln2/2, exp(r) by its Taylor series to degree 13. */
static double det_exp(double x) {
    if (!(x > -745.0)) return 0.0;
    if (x > 0.0) x = 0.0;
    const double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
    double kd = x * 1.44269504088896338700 - 0.5; /* round to nearest, x <= 0 */
    int k = (int)kd;                               /* truncates toward zero */
    double r = (x - k * ln2_hi) - k * ln2_lo;
    double p = 1.0 / 6227020800.0;                 /* 1/13! */
    static const double inv_fact[13] = {1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0,
                                        1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0,
                                        1.0 / 6.0, 0.5, 1.0, 1.0};
    for (int i = 0; i < 13; i++) p = p * r + inv_fact[i];
    /* multiply by 2^k in steps that stay normal until the last */
    while (k < -1000) {
        p *= 9.33263618503218878990e-302; /* 2^-1000 */
        k += 1000;
    }
    union { uint64_t u; double d; } two_k;
    two_k.u = (uint64_t)(k + 1023) << 52;
    return p * two_k.d;
}

itl_sampler *itl_sampler_new(uint64_t seed, double temperature, int32_t top_k, double top_p) {
    if (temperature != temperature || top_p != top_p || !(top_p > 0.0)) return NULL;
    itl_sampler *s = calloc(1, sizeof(itl_sampler));
    if (!s) return NULL;
    s->temperature = temperature;
    s->top_k = top_k;
    s->top_p = top_p;
#ifdef ITL_TEXT_AVX2
    s->avx2 = __builtin_cpu_supports("avx2") != 0;
#endif
    s->inc = (0x5851F42D4C957F2DULL << 1) | 1u; /* one fixed stream; the seed picks the start */
    s->state = 0;
    pcg32(s);
    s->state += seed;
    pcg32(s);
    return s;
}

void itl_sampler_free(itl_sampler *s) {
    if (!s) return;
    free(s->key);
    free(s->tmp);
    free(s->w);
    free(s->aw);
    free(s);
}

/* Ascending keys order finite logits by (logit descending, id ascending); -0 and +0 are one value. */
static uint64_t sort_key(float v, int32_t id) {
    float z = v + 0.0f; /* -0 -> +0 */
    uint32_t b;
    memcpy(&b, &z, sizeof b);
    uint32_t down = (b & 0x80000000u) ? b : ~b & 0x7FFFFFFFu; /* decreasing in v */
    return (uint64_t)down << 32 | (uint32_t)id;
}

static int32_t key_id(uint64_t k) { return (int32_t)(uint32_t)k; }

/* Sort keys[0..n) ascending (the order is total: any sort gives it). Few keys: insertion sort; up
 * to 512: a bucket pass then insertion sort; more: they arrive in increasing id order, so a stable
 * sort of the high 32 bits suffices (LSD radix, bytes shared by all keys skipped). */
static void sort_keys(uint64_t *a, uint64_t *tmp, int32_t n) {
    if (n <= 48) {
        for (int32_t i = 1; i < n; i++) {
            uint64_t x = a[i];
            int32_t j = i;
            for (; j > 0 && a[j - 1] > x; j--) a[j] = a[j - 1];
            a[j] = x;
        }
        return;
    }
    if (n <= 512) { /* buckets by linear position in the key range (monotone), then insertion sort */
        uint32_t lo = UINT32_MAX, hi = 0;
        for (int32_t i = 0; i < n; i++) {
            uint32_t h = (uint32_t)(a[i] >> 32);
            lo = h < lo ? h : lo;
            hi = h > hi ? h : hi;
        }
        uint64_t mul = ((uint64_t)n << 32) / ((uint64_t)(hi - lo) + 1); /* bucket = (h - lo) * n / span */
        int32_t start[513];
        memset(start, 0, sizeof(int32_t) * (size_t)(n + 1));
        for (int32_t i = 0; i < n; i++) start[(((uint64_t)((uint32_t)(a[i] >> 32) - lo) * mul) >> 32) + 1]++;
        for (int32_t b = 0; b < n; b++) start[b + 1] += start[b];
        for (int32_t i = 0; i < n; i++) tmp[start[((uint64_t)((uint32_t)(a[i] >> 32) - lo) * mul) >> 32]++] = a[i];
        for (int32_t i = 0; i < n; i++) { /* only keys within a bucket are out of order */
            uint64_t x = tmp[i];
            int32_t j = i;
            for (; j > 0 && a[j - 1] > x; j--) a[j] = a[j - 1];
            a[j] = x;
        }
        return;
    }
    int32_t cnt[4][256];
    memset(cnt, 0, sizeof cnt);
    for (int32_t i = 0; i < n; i++) {
        uint32_t h = (uint32_t)(a[i] >> 32);
        cnt[0][h & 255]++;
        cnt[1][(h >> 8) & 255]++;
        cnt[2][(h >> 16) & 255]++;
        cnt[3][h >> 24]++;
    }
    uint64_t *src = a, *dst = tmp;
    for (int d = 0; d < 4; d++) {
        int shift = 32 + 8 * d;
        if (cnt[d][(src[0] >> shift) & 255] == n) continue; /* one value of this byte: nothing to do */
        int32_t pos = 0;
        for (int b = 0; b < 256; b++) {
            int32_t c = cnt[d][b];
            cnt[d][b] = pos;
            pos += c;
        }
        for (int32_t i = 0; i < n; i++) dst[cnt[d][(src[i] >> shift) & 255]++] = src[i];
        uint64_t *t = src;
        src = dst;
        dst = t;
    }
    if (src != a) memcpy(a, src, sizeof(uint64_t) * (size_t)n);
}

/* The draw over the first m sorted keys, exactly as defined: weights, total, top-p cut, draw. */
static int32_t draw_sorted(itl_sampler *s, const float *logits, const uint64_t *key, int32_t m, double top) {
    double *w = s->w, total = 0.0;
    for (int32_t i = 0; i < m; i++) {
        w[i] = det_exp(((double)logits[key_id(key[i])] - top) / s->temperature);
        total += w[i];
    }
    if (s->top_p < 1.0) { /* the smallest prefix whose mass reaches top_p of the total */
        double cum = 0.0, want = s->top_p * total;
        for (int32_t i = 0; i < m; i++) {
            cum += w[i];
            if (cum >= want) {
                m = i + 1;
                total = cum;
                break;
            }
        }
    }
    double u = uniform(s) * total, acc = 0.0;
    for (int32_t i = 0; i < m; i++) {
        acc += w[i];
        if (u < acc) return key_id(key[i]);
    }
    return key_id(key[m - 1]);
}

/* The defining algorithm: every finite id sorted and weighed. */
static int32_t sample_full(itl_sampler *s, const float *logits, int32_t n, double top) {
    int32_t m = 0;
    for (int32_t i = 0; i < n; i++)
        if (finite_f(logits[i])) s->key[m++] = sort_key(logits[i], i);
    sort_keys(s->key, s->tmp, m);
    if (s->top_k > 0 && s->top_k < m) m = s->top_k;
    return draw_sorted(s, logits, s->key, m, top);
}

/* Keys of the finite logits >= floor (in id order), sorted; their count. */
ITL_INLINE int32_t gather_body(const float *logits, int32_t n, float floor, uint64_t *key) {
    int32_t m = 0, i = 0;
    for (; i + 8 <= n; i += 8) { /* a mask per 8 logits (vectorized compares), then its set bits */
        unsigned mask = 0;
        for (int q = 0; q < 8; q++) mask |= (unsigned)(logits[i + q] >= floor && logits[i + q] <= 3.40282347e38f) << q;
        while (mask) {
            int q = ITL_CTZ(mask);
            mask &= mask - 1;
            key[m++] = sort_key(logits[i + q], i + q);
        }
    }
    for (; i < n; i++)
        if (logits[i] >= floor && logits[i] <= 3.40282347e38f) key[m++] = sort_key(logits[i], i);
    return m;
}

ITL_VECTORIZE static int32_t gather_plain(const float *logits, int32_t n, float floor, uint64_t *key) {
    return gather_body(logits, n, floor, key);
}

#ifdef ITL_TEXT_AVX2
/* gather_body with AVX2 compares: a mask per 8 logits, then its set bits */
__attribute__((target("avx2"))) static int32_t gather_avx2(const float *logits, int32_t n, float floor, uint64_t *key) {
    const __m256 lo = _mm256_set1_ps(floor), hi = _mm256_set1_ps(3.40282347e38f);
    int32_t m = 0, i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(logits + i);
        unsigned mask = (unsigned)_mm256_movemask_ps(
            _mm256_and_ps(_mm256_cmp_ps(v, lo, _CMP_GE_OQ), _mm256_cmp_ps(v, hi, _CMP_LE_OQ)));
        while (mask) {
            int q = ITL_CTZ(mask);
            mask &= mask - 1;
            key[m++] = sort_key(logits[i + q], i + q);
        }
    }
    for (; i < n; i++)
        if (logits[i] >= floor && logits[i] <= 3.40282347e38f) key[m++] = sort_key(logits[i], i);
    return m;
}
#endif

/* Keys of the finite logits >= floor (a finite float), sorted; their count. */
static int32_t gather_sorted(itl_sampler *s, const float *logits, int32_t n, float floor) {
#ifdef ITL_TEXT_AVX2
    int32_t m = s->avx2 ? gather_avx2(logits, n, floor, s->key) : gather_plain(logits, n, floor, s->key);
#else
    int32_t m = gather_plain(logits, n, floor, s->key);
#endif
    sort_keys(s->key, s->tmp, m);
    return m;
}

/* top - c * temperature as a float, at least -FLT_MAX (a floor for gather_sorted). */
static float floor_below(double top, double c, double temperature) {
    double f = top - c * temperature;
    return f > -3.4028234663852886e38 ? (float)f : -3.4028234663852886e38f;
}

/* Gather floors, in units of the temperature below the largest logit. */
#define ITL_NFLOOR 6
#define ITL_NMASS 3 /* the first floors get a mass estimate; the deeper ones are simply tried */
static const double floor_nats[ITL_NFLOOR] = {2.0, 4.5, 8.0, 14.0, 24.0, 40.0};
/* the same for top-k, where a count decides (finer: what is gathered is sorted) */
#define ITL_NKFLOOR 8
static const double kfloor_nats[ITL_NKFLOOR] = {1.0, 1.5, 2.25, 3.25, 4.5, 6.0, 8.0, 11.0};

/* Order-preserving int32 of a float's bits (-0 and +0 alike: both 0); INT32_MIN for NaN and
 * infinities. Branch-free, so the maximum below vectorizes. */
static inline int32_t ord_bits(uint32_t b) {
    uint32_t neg = b >> 31, mag = b & 0x7FFFFFFFu;
    uint32_t o = (mag ^ (0u - neg)) + neg;      /* two's complement negation when negative */
    uint32_t bad = 0u - (uint32_t)(mag >= 0x7F800000u); /* all ones: not finite */
    return (int32_t)((o & ~bad) | (0x80000000u & bad));
}

ITL_INLINE int32_t max_ord_body(const float *logits, int32_t n) {
    int32_t mx = INT32_MIN;
    for (int32_t i = 0; i < n; i++) {
        uint32_t b;
        memcpy(&b, logits + i, sizeof b);
        int32_t o = ord_bits(b);
        mx = o > mx ? o : mx;
    }
    return mx;
}

static int32_t max_ord_plain(const float *logits, int32_t n) { return max_ord_body(logits, n); }

#ifdef ITL_TEXT_AVX2
/* max_ord_body by AVX2 float maxima (NaN and infinities replaced by -inf first) */
__attribute__((target("avx2"))) static int32_t max_ord_avx2(const float *logits, int32_t n) {
    const __m256 big = _mm256_set1_ps(3.40282347e38f), ninf = _mm256_set1_ps(-__builtin_inff());
    __m256 mx = ninf;
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(logits + i);
        __m256 ok = _mm256_and_ps(_mm256_cmp_ps(v, big, _CMP_LE_OQ), _mm256_cmp_ps(v, ninf, _CMP_GT_OQ));
        mx = _mm256_max_ps(mx, _mm256_blendv_ps(ninf, v, ok));
    }
    float a[8];
    _mm256_storeu_ps(a, mx);
    int32_t best = INT32_MIN;
    for (int q = 0; q < 8; q++) {
        uint32_t b;
        memcpy(&b, a + q, sizeof b);
        int32_t o = ord_bits(b);
        best = o > best ? o : best;
    }
    int32_t rest = max_ord_body(logits + i, n - i);
    return rest > best ? rest : best;
}

/* count_floors with AVX2: one pass, a count vector per floor */
__attribute__((target("avx2"))) static void count_floors_avx2(const float *logits, int32_t n, const float *floors,
                                                              int32_t *counts) {
    __m256 f[ITL_NKFLOOR];
    __m256i c[ITL_NKFLOOR];
    for (int j = 0; j < ITL_NKFLOOR; j++) {
        f[j] = _mm256_set1_ps(floors[j]);
        c[j] = _mm256_setzero_si256();
    }
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(logits + i);
        for (int j = 0; j < ITL_NKFLOOR; j++) /* a true compare is -1 in each lane */
            c[j] = _mm256_sub_epi32(c[j], _mm256_castps_si256(_mm256_cmp_ps(v, f[j], _CMP_GE_OQ)));
    }
    for (int j = 0; j < ITL_NKFLOOR; j++) {
        int32_t a[8], t = 0;
        _mm256_storeu_si256((__m256i *)(void *)a, c[j]);
        for (int q = 0; q < 8; q++) t += a[q];
        for (int32_t k = i; k < n; k++) t += logits[k] >= floors[j];
        counts[j] = t;
    }
}
#endif

/* The first index of the largest finite logit, or -1 when none: a vectorized maximum of ord_bits,
 * then a scan for its first occurrence (== also finds -0 for +0). */
static int32_t first_max(const itl_sampler *s, const float *logits, int32_t n) {
#ifdef ITL_TEXT_AVX2
    int32_t mx = s->avx2 ? max_ord_avx2(logits, n) : max_ord_plain(logits, n);
#else
    (void)s;
    int32_t mx = max_ord_plain(logits, n);
#endif
    if (mx == INT32_MIN) return -1;
    uint32_t b = mx >= 0 ? (uint32_t)mx : 0x80000000u | (0u - (uint32_t)mx);
    float mv;
    memcpy(&mv, &b, sizeof mv);
    int32_t i = 0;
    while (!(logits[i] == mv)) i++;
    return i;
}

/* w[i] ~ exp(x), x = (logits[i] - top) * inv_t in float (0 where the logit is not finite; x below
 * -80 taken as -80), and wx[i] = w[i] * -x. Error (only bounds use these): x is within 1.81e-7 |x|
 * of the defined (logits[i] - top) / temperature (three float roundings), and w[i] within 7e-7
 * (relative) of exp(x): Cody-Waite reduction to |r| <= ln2/2, the degree-6 Taylor polynomial
 * (truncation 2.4e-7) by Estrin's scheme (a short dependency chain), float rounding (< 4e-7).
 * Straight-line code the compiler vectorizes; approx_weights_avx2 does the same operations. */
ITL_INLINE void approx_body(const float *logits, int32_t n, float top, float inv_t, float *w, float *wx) {
    for (int32_t i = 0; i < n; i++) {
        float d = logits[i] - top;
        float x = d * inv_t;
        x = x > -80.0f ? x : -80.0f; /* also NaN */
        float t = x * 1.44269504f + 12582912.0f; /* round(x / ln2) + 1.5 * 2^23 */
        float kf = t - 12582912.0f;
        float r = (x - kf * 0.693359375f) - kf * -2.12194440e-4f;
        float r2 = r * r;
        float p = ((1.0f + r) + r2 * (0.5f + r * (1.0f / 6.0f))) +
                  (r2 * r2) * ((1.0f / 24.0f + r * (1.0f / 120.0f)) + r2 * (1.0f / 720.0f));
        uint32_t tb, sb;
        memcpy(&tb, &t, sizeof tb);
        sb = (tb - 0x4B400000u + 127u) << 23; /* 2^k, k >= -116 */
        float sc;
        memcpy(&sc, &sb, sizeof sc);
        float e = p * sc;
        e = d - d == 0.0f ? e : 0.0f; /* finite logits only */
        w[i] = e;
        wx[i] = e * -x;
    }
}

/* out[0] = sum of w, out[1] = sum of w * -x (in double, any order: only bounds use them), and
 * out[2 + j] ~ the sum of the w >= lims[j], j < ITL_NMASS (rough: it only picks a gather floor) */
ITL_VECTORIZE static void approx_weights(const float *logits, int32_t n, float top, float inv_t, float *w, float *wx,
                                         const float *lims, double *out) {
    approx_body(logits, n, top, inv_t, w, wx);
    double a[4] = {0.0, 0.0, 0.0, 0.0}, b[4] = {0.0, 0.0, 0.0, 0.0};
    int32_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (int q = 0; q < 4; q++) {
            a[q] += (double)w[i + q];
            b[q] += (double)wx[i + q];
        }
    for (; i < n; i++) {
        a[0] += (double)w[i];
        b[0] += (double)wx[i];
    }
    out[0] = (a[0] + a[1]) + (a[2] + a[3]);
    out[1] = (b[0] + b[1]) + (b[2] + b[3]);
    for (int j = 0; j < ITL_NMASS; j++) {
        float m[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (i = 0; i + 8 <= n; i += 8)
            for (int q = 0; q < 8; q++) m[q] += w[i + q] >= lims[j] ? w[i + q] : 0.0f;
        double t = ((double)m[0] + m[1] + m[2] + m[3]) + ((double)m[4] + m[5] + m[6] + m[7]);
        for (; i < n; i++) t += w[i] >= lims[j] ? w[i] : 0.0f;
        out[2 + j] = t;
    }
}

#ifdef ITL_TEXT_AVX2
/* approx_weights in one AVX2 pass: the same float operations as approx_body, 8 logits at a time */
__attribute__((target("avx2"))) static void approx_weights_avx2(const float *logits, int32_t n, float top, float inv_t,
                                                                float *w, const float *lims, double *out) {
    const __m256 vtop = _mm256_set1_ps(top), vinv = _mm256_set1_ps(inv_t), lowest = _mm256_set1_ps(-80.0f);
    const __m256 log2e = _mm256_set1_ps(1.44269504f), magic = _mm256_set1_ps(12582912.0f);
    const __m256 ln2hi = _mm256_set1_ps(0.693359375f), ln2lo = _mm256_set1_ps(-2.12194440e-4f);
    const __m256 c6 = _mm256_set1_ps(1.0f / 720.0f), c5 = _mm256_set1_ps(1.0f / 120.0f);
    const __m256 c4 = _mm256_set1_ps(1.0f / 24.0f), c3 = _mm256_set1_ps(1.0f / 6.0f);
    const __m256 c2 = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
    const __m256i bias = _mm256_set1_epi32((int)(127u - 0x4B400000u));
    __m256 lim[ITL_NMASS], mass[ITL_NMASS];
    for (int j = 0; j < ITL_NMASS; j++) {
        lim[j] = _mm256_set1_ps(lims[j]);
        mass[j] = _mm256_setzero_ps();
    }
    __m256d sw0 = _mm256_setzero_pd(), sw1 = sw0, sx0 = sw0, sx1 = sw0;
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 d = _mm256_sub_ps(_mm256_loadu_ps(logits + i), vtop);
        __m256 x = _mm256_max_ps(_mm256_mul_ps(d, vinv), lowest); /* NaN -> -80 */
        __m256 t = _mm256_add_ps(_mm256_mul_ps(x, log2e), magic);
        __m256 kf = _mm256_sub_ps(t, magic);
        __m256 r = _mm256_sub_ps(_mm256_sub_ps(x, _mm256_mul_ps(kf, ln2hi)), _mm256_mul_ps(kf, ln2lo));
        __m256 r2 = _mm256_mul_ps(r, r);
        __m256 lo2 = _mm256_add_ps(_mm256_add_ps(one, r), _mm256_mul_ps(r2, _mm256_add_ps(c2, _mm256_mul_ps(r, c3))));
        __m256 hi4 = _mm256_add_ps(_mm256_add_ps(c4, _mm256_mul_ps(r, c5)), _mm256_mul_ps(r2, c6));
        __m256 p = _mm256_add_ps(lo2, _mm256_mul_ps(_mm256_mul_ps(r2, r2), hi4));
        __m256 sc = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_castps_si256(t), bias), 23));
        __m256 fin = _mm256_cmp_ps(_mm256_sub_ps(d, d), _mm256_setzero_ps(), _CMP_EQ_OQ);
        __m256 e = _mm256_and_ps(_mm256_mul_ps(p, sc), fin);
        _mm256_storeu_ps(w + i, e);
        __m256 ex = _mm256_mul_ps(e, x); /* w * x <= 0 */
        sw0 = _mm256_add_pd(sw0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
        sw1 = _mm256_add_pd(sw1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
        sx0 = _mm256_add_pd(sx0, _mm256_cvtps_pd(_mm256_castps256_ps128(ex)));
        sx1 = _mm256_add_pd(sx1, _mm256_cvtps_pd(_mm256_extractf128_ps(ex, 1)));
        for (int j = 0; j < ITL_NMASS; j++)
            mass[j] = _mm256_add_ps(mass[j], _mm256_and_ps(e, _mm256_cmp_ps(e, lim[j], _CMP_GE_OQ)));
    }
    double a[4], b[4];
    _mm256_storeu_pd(a, _mm256_add_pd(sw0, sw1));
    _mm256_storeu_pd(b, _mm256_add_pd(sx0, sx1));
    double sw = (a[0] + a[1]) + (a[2] + a[3]), sx = -((b[0] + b[1]) + (b[2] + b[3]));
    double ms[ITL_NMASS];
    for (int j = 0; j < ITL_NMASS; j++) {
        float m[8];
        _mm256_storeu_ps(m, mass[j]);
        ms[j] = ((double)m[0] + m[1] + m[2] + m[3]) + ((double)m[4] + m[5] + m[6] + m[7]);
    }
    if (i < n) { /* the last n % 8 logits */
        float tw[8], twx[8];
        approx_body(logits + i, n - i, top, inv_t, tw, twx);
        for (int32_t k = 0; k < n - i; k++) {
            w[i + k] = tw[k];
            sw += (double)tw[k];
            sx += (double)twx[k];
            for (int j = 0; j < ITL_NMASS; j++) ms[j] += tw[k] >= lims[j] ? tw[k] : 0.0f;
        }
    }
    out[0] = sw;
    out[1] = sx;
    for (int j = 0; j < ITL_NMASS; j++) out[2 + j] = ms[j];
}
#endif

/* counts[j] = the number of logits >= floors[j] */
ITL_VECTORIZE static void count_floors(const float *logits, int32_t n, const float *floors, int32_t *counts) {
    for (int j = 0; j < ITL_NKFLOOR; j++) {
        int32_t c = 0;
        for (int32_t i = 0; i < n; i++) c += logits[i] >= floors[j];
        counts[j] = c;
    }
}

/* The sum of the weights in double (any order): each within 2e-12 (relative) of its exact
 * det_exp((logits[i] - top) / temperature): x = (logits[i] - top) * inv_t within 3 roundings
 * (2.5e-13 absolute for |x| <= 745; below -700 taken as -700, under 1e-304 either way), reduction
 * to |r| <= ln2/2 (+1e-13), the degree-11 Taylor polynomial (truncation 1.3e-14). For the rare calls
 * the float weights leave undecided. */
static double approx_sum_double(const float *logits, int32_t n, double top, double inv_t) {
    double acc[4] = {0.0, 0.0, 0.0, 0.0};
    for (int32_t i = 0; i < n; i++) {
        double d = (double)logits[i] - top;
        if (!(d - d == 0.0)) continue; /* not finite */
        double x = d * inv_t;
        x = x > -700.0 ? x : -700.0;
        double t = x * 1.4426950408889634 + 6755399441055744.0; /* round(x / ln2) + 1.5 * 2^52 */
        double kf = t - 6755399441055744.0;
        double r = (x - kf * 6.93147180369123816490e-01) - kf * 1.90821492927058770002e-10;
        double p = 1.0 / 39916800.0;
        static const double c[11] = {1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0,
                                     1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0};
        for (int q = 0; q < 11; q++) p = p * r + c[q];
        uint64_t tb, sb;
        memcpy(&tb, &t, sizeof tb);
        sb = (tb - 0x4338000000000000ULL + 1023u) << 52; /* 2^k, k >= -1011 */
        double sc;
        memcpy(&sc, &sb, sizeof sc);
        acc[i & 3] += p * sc;
    }
    return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

/* The id when every total in [lo, hi] gives the same one, else -1. The running sum that settles
 * the id, want (the top-p cut: top_p * total) or u * total (the draw, drawn), lies in [tlo, thi];
 * the logits above a floor, sorted and weighed exactly, are the defined order's first ones, with
 * its running sums. mass[j] (rough) skips the first floors that hold too little. */
static int32_t decide(itl_sampler *s, const float *logits, int32_t n, double top, int drawn, double u, double lo,
                      double hi, const double *mass) {
    double tlo = drawn ? u * lo : s->top_p * lo, thi = drawn ? u * hi : s->top_p * hi, temp = s->temperature;
    double *ew = s->w;
    for (int j = 0; j < ITL_NFLOOR; j++) {
        if (j < ITL_NMASS && mass[j] < thi * 1.001) continue; /* too little mass above this floor */
        int32_t m = gather_sorted(s, logits, n, floor_below(top, floor_nats[j], temp));
        double cum = 0.0, prev = 0.0;
        int32_t at = -1;
        for (int32_t k = 0; k < m; k++) {
            ew[k] = det_exp(((double)logits[key_id(s->key[k])] - top) / temp);
            prev = cum;
            cum += ew[k];
            if (drawn ? cum > thi : cum >= thi) {
                at = k;
                break;
            }
        }
        if (at < 0) continue; /* not enough mass gathered: a lower floor */
        if (at > 0 && (drawn ? prev > tlo : prev >= tlo)) return -1; /* the bounds straddle a running sum */
        if (drawn) return key_id(s->key[at]);
        /* top-p: the prefix is s->key[0..at], its sum cum exact; the draw as defined */
        double uu = uniform(s) * cum, a = 0.0;
        for (int32_t k = 0; k <= at; k++) {
            a += ew[k];
            if (uu < a) return key_id(s->key[k]);
        }
        return key_id(s->key[at]);
    }
    return -1;
}

int32_t itl_sampler_sample(itl_sampler *s, const float *logits, int32_t n) {
    if (!s || !logits || n <= 0) return ITL_TEXT_E_ARG;
    int32_t best = first_max(s, logits, n);
    if (best < 0) return ITL_TEXT_E_LOGITS;
    if (!(s->temperature > 0.0) || s->top_k == 1) return best;
    if (n > s->cap) {
        uint64_t *key = realloc(s->key, sizeof(uint64_t) * (size_t)n);
        if (key) s->key = key;
        uint64_t *tmp = realloc(s->tmp, sizeof(uint64_t) * (size_t)n);
        if (tmp) s->tmp = tmp;
        double *w = realloc(s->w, sizeof(double) * (size_t)n);
        if (w) s->w = w;
        float *aw = realloc(s->aw, sizeof(float) * 2 * (size_t)n);
        if (aw) s->aw = aw;
        if (!key || !tmp || !w || !aw) return ITL_TEXT_E_NOMEM;
        s->cap = n;
    }
    double top = (double)logits[best], temp = s->temperature;
    if (s->top_k > 0 && s->top_k < n) { /* only the top_k largest can matter: sort a few more than them */
        float floors[ITL_NKFLOOR];
        int32_t counts[ITL_NKFLOOR];
        for (int widen = 0; widen < 3; widen++) { /* floors 16x lower each time none holds top_k logits */
            for (int j = 0; j < ITL_NKFLOOR; j++)
                floors[j] = floor_below(top, kfloor_nats[j] * (1 << (4 * widen)), temp);
#ifdef ITL_TEXT_AVX2
            if (s->avx2)
                count_floors_avx2(logits, n, floors, counts);
            else
#endif
                count_floors(logits, n, floors, counts);
            for (int j = 0; j < ITL_NKFLOOR; j++) {
                if (counts[j] < s->top_k) continue;
                int32_t m = gather_sorted(s, logits, n, floors[j]);
                if (m < s->top_k) return sample_full(s, logits, n, top); /* +inf logits were counted */
                return draw_sorted(s, logits, s->key, s->top_k, top);
            }
        }
        return sample_full(s, logits, n, top);
    }
    float inv_t = (float)(1.0 / temp);
    if (!(inv_t > 0.0f && inv_t < 3.0e38f) || temp > 1e30) /* 1 / temp not a normal float */
        return sample_full(s, logits, n, top);
    float *w = s->aw, *wx = w + n, lims[ITL_NMASS];
    for (int j = 0; j < ITL_NMASS; j++) lims[j] = (float)det_exp(-floor_nats[j]);
    double sums[2 + ITL_NMASS];
#ifdef ITL_TEXT_AVX2
    if (s->avx2)
        approx_weights_avx2(logits, n, (float)top, inv_t, w, lims, sums);
    else
#endif
        approx_weights(logits, n, (float)top, inv_t, w, wx, lims, sums);
    double approx = sums[0], spread = sums[1];
    /* The defined total is the sorted running sum of the exact weights: within n * 2^-53 (relative)
     * of their exact sum, which is within the error bound above of sum(w), itself within n * 2^-53
     * of approx. The largest logit's approximate weight is 1, so approx >= 1 and covers what the
     * -80 floor adds (< 2e-35 each). */
    double g = 2.0 * ((double)n + 2.0) * (1.0 / 9007199254740992.0);
    double err = 2.0e-7 * spread + 2.0e-6 * approx + 1e-30;
    double lo = (approx - err) * (1.0 - 2.0 * g), hi = (approx + err) * (1.0 + 2.0 * g);
    int drawn = s->top_p >= 1.0;
    uint64_t saved = s->state;
    double u = drawn ? uniform(s) : 0.0;
    int32_t id = decide(s, logits, n, top, drawn, u, lo, hi, sums + 2);
    if (id < 0) { /* undecided: once more with bounds a million times tighter */
        approx = approx_sum_double(logits, n, top, 1.0 / temp);
        err = 2.0e-12 * approx;
        lo = (approx - err) * (1.0 - 2.0 * g);
        hi = (approx + err) * (1.0 + 2.0 * g);
        id = decide(s, logits, n, top, drawn, u, lo, hi, sums + 2);
    }
    if (id >= 0) return id;
    s->state = saved;
    return sample_full(s, logits, n, top);
}
