// gguf.h: read and write GGUF v3 files (https://github.com/ggerganov/ggml/blob/master/docs/gguf.md).
//
// Layout of a GGUF file, all little-endian:
//   magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
//   n_kv x      { string key | u32 value_type | value }
//   n_tensors x { string name | u32 n_dims | u64 ne[n_dims] | u32 ggml_type | u64 offset }
//   padding to `general.alignment` (default 32)
//   tensor data; each tensor starts at data_offset + offset, offset a multiple of the alignment
// where string = u64 length + bytes (no terminator), and an array value = u32 element type +
// u64 count + elements.
//
// The reader never trusts a count or a length: every read is bounds-checked against the file
// size before it happens, and a failure names what was being read (header, key, tensor) and the
// offset. Tensor data is not copied: the file is mmap'ed and tensors point into it.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "common.h"

// ----------------------------------------------------------------------------
// constants (the one place that knows GGUF's numbers)

static const uint32_t GGUF_MAGIC = 0x46554747;  // "GGUF" read as a little-endian u32
static const uint32_t GGUF_VERSION = 3;         // what we write; we read 2 and 3 (same layout)
static const uint64_t GGUF_DEFAULT_ALIGNMENT = 32;
static const uint32_t GGUF_MAX_DIMS = 4;
static const uint32_t GGUF_MAX_ARRAY_DEPTH = 4;  // arrays of arrays; nobody needs more

enum GGUFValueType : uint32_t {
    GGUF_TYPE_UINT8 = 0,
    GGUF_TYPE_INT8 = 1,
    GGUF_TYPE_UINT16 = 2,
    GGUF_TYPE_INT16 = 3,
    GGUF_TYPE_UINT32 = 4,
    GGUF_TYPE_INT32 = 5,
    GGUF_TYPE_FLOAT32 = 6,
    GGUF_TYPE_BOOL = 7,
    GGUF_TYPE_STRING = 8,
    GGUF_TYPE_ARRAY = 9,
    GGUF_TYPE_UINT64 = 10,
    GGUF_TYPE_INT64 = 11,
    GGUF_TYPE_FLOAT64 = 12,
    GGUF_TYPE_COUNT = 13,
};
static const char* const GGUF_TYPE_NAME[GGUF_TYPE_COUNT] = {
    "u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64"};
static const uint32_t GGUF_TYPE_SIZE[GGUF_TYPE_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

// Tensor element types (ggml's numbering). The engine runs the ones below; the others are named
// so that the error for an unsupported file says what it found.
enum GGMLType : uint32_t {
    GGML_TYPE_F32 = 0,
    GGML_TYPE_F16 = 1,
    GGML_TYPE_Q4_0 = 2,
    GGML_TYPE_Q4_1 = 3,
    GGML_TYPE_Q5_0 = 6,
    GGML_TYPE_Q5_1 = 7,
    GGML_TYPE_Q8_0 = 8,
    GGML_TYPE_Q2_K = 10,
    GGML_TYPE_Q3_K = 11,
    GGML_TYPE_Q4_K = 12,
    GGML_TYPE_Q5_K = 13,
    GGML_TYPE_Q6_K = 14,
};
// llama.cpp's general.file_type values for the files `vicuna quantize` writes
enum GGUFFileType : uint32_t {
    GGUF_FTYPE_ALL_F32 = 0,
    GGUF_FTYPE_MOSTLY_F16 = 1,
    GGUF_FTYPE_MOSTLY_Q4_0 = 2,
    GGUF_FTYPE_MOSTLY_Q4_1 = 3,
    GGUF_FTYPE_MOSTLY_Q8_0 = 7,
    GGUF_FTYPE_MOSTLY_Q5_0 = 8,
    GGUF_FTYPE_MOSTLY_Q5_1 = 9,
    GGUF_FTYPE_MOSTLY_Q4_K_S = 14,
    GGUF_FTYPE_MOSTLY_Q4_K_M = 15,
    GGUF_FTYPE_MOSTLY_Q5_K_S = 16,
    GGUF_FTYPE_MOSTLY_Q5_K_M = 17,
    GGUF_FTYPE_MOSTLY_Q6_K = 18,
};

struct TypeInfo {
    const char* name;
    uint32_t block;       // elements per block
    uint32_t block_size;  // bytes per block
    bool supported;       // can the engine run it
};

static TypeInfo ggml_type_info(uint32_t type) {
    switch (type) {
        case GGML_TYPE_F32: return {"F32", 1, 4, true};
        case GGML_TYPE_F16: return {"F16", 1, 2, true};
        case GGML_TYPE_Q4_0: return {"Q4_0", 32, 18, true};
        case GGML_TYPE_Q4_1: return {"Q4_1", 32, 20, true};
        case GGML_TYPE_Q8_0: return {"Q8_0", 32, 34, true};
        case GGML_TYPE_Q5_0: return {"Q5_0", 32, 22, true};
        case GGML_TYPE_Q5_1: return {"Q5_1", 32, 24, true};
        case 9: return {"Q8_1", 32, 36, false};
        case GGML_TYPE_Q2_K: return {"Q2_K", 256, 84, true};
        case GGML_TYPE_Q3_K: return {"Q3_K", 256, 110, true};
        case GGML_TYPE_Q4_K: return {"Q4_K", 256, 144, true};
        case GGML_TYPE_Q5_K: return {"Q5_K", 256, 176, true};
        case GGML_TYPE_Q6_K: return {"Q6_K", 256, 210, true};
        case 15: return {"Q8_K", 256, 292, false};
        case 16: return {"IQ2_XXS", 256, 66, false};
        case 17: return {"IQ2_XS", 256, 74, false};
        case 18: return {"IQ3_XXS", 256, 98, false};
        case 19: return {"IQ1_S", 256, 50, false};
        case 20: return {"IQ4_NL", 32, 18, false};
        case 21: return {"IQ3_S", 256, 110, false};
        case 22: return {"IQ2_S", 256, 82, false};
        case 23: return {"IQ4_XS", 256, 136, false};
        case 24: return {"I8", 1, 1, false};
        case 25: return {"I16", 1, 2, false};
        case 26: return {"I32", 1, 4, false};
        case 27: return {"I64", 1, 8, false};
        case 28: return {"F64", 1, 8, false};
        case 29: return {"IQ1_M", 256, 56, false};
        case 30: return {"BF16", 1, 2, false};
        case 34: return {"TQ1_0", 256, 54, false};
        case 35: return {"TQ2_0", 256, 66, false};
        case 39: return {"MXFP4", 32, 17, false};
        default: return {nullptr, 0, 0, false};
    }
}

// ----------------------------------------------------------------------------
// parsed file

struct GGUFValue {
    uint32_t type = 0;
    uint64_t u = 0;  // unsigned integers and bool
    int64_t i = 0;   // signed integers
    double f = 0;    // floats
    std::string_view str;                   // GGUF_TYPE_STRING, points into the file
    uint32_t arr_type = 0;                  // GGUF_TYPE_ARRAY: element type
    uint64_t arr_len = 0;                   //                  element count
    const uint8_t* arr_data = nullptr;      //                  numeric elements (unaligned, LE)
    std::vector<std::string_view> arr_str;  //                  string elements
};

struct GGUFKV {
    std::string_view key;
    GGUFValue val;
    uint64_t raw_begin = 0, raw_end = 0;  // byte range of the whole entry, for verbatim copies
};

struct GGUFTensor {
    std::string_view name;
    uint32_t n_dims = 0;
    uint64_t ne[GGUF_MAX_DIMS] = {1, 1, 1, 1};  // ne[0] is the contiguous (row) dimension
    uint32_t type = 0;
    uint64_t offset = 0;  // from the start of the data section
    uint64_t n_elements = 0;
    uint64_t n_bytes = 0;
    const uint8_t* data = nullptr;
};

// A read-only mapping of a whole file, unmapped when its owner goes away. Move-only: one owner,
// so a GGUFFile can be handed on (to a Model) without the mapping being released twice.
struct FileMapping {
    const uint8_t* data = nullptr;
    size_t size = 0;

    FileMapping() = default;
    FileMapping(const uint8_t* d, size_t n) : data(d), size(n) {}
    FileMapping(FileMapping&& o) noexcept : data(o.data), size(o.size) { o.data = nullptr, o.size = 0; }
    FileMapping& operator=(FileMapping&& o) noexcept {
        if (this != &o) {
            unmap();
            data = o.data, size = o.size;
            o.data = nullptr, o.size = 0;
        }
        return *this;
    }
    FileMapping(const FileMapping&) = delete;
    FileMapping& operator=(const FileMapping&) = delete;
    ~FileMapping() { unmap(); }

    void unmap() {
        if (data) munmap((void*)data, size);
        data = nullptr, size = 0;
    }
};

// A parsed GGUF file. Names, strings and tensor data are views into `data`, so they live as long
// as the GGUFFile (moving it keeps them valid: the mapping itself does not move). Move-only; the
// mapping is released by the destructor, also when parsing fails half-way.
struct GGUFFile {
    std::string path;
    const uint8_t* data = nullptr;  // the whole file: mapping.data, or a caller's buffer
    size_t size = 0;
    FileMapping mapping;            // owns data when the file was mapped (empty for a caller's buffer)
    uint32_t version = 0;
    uint64_t alignment = GGUF_DEFAULT_ALIGNMENT;
    uint64_t data_offset = 0;
    std::vector<GGUFKV> kvs;
    std::vector<GGUFTensor> tensors;
    std::unordered_map<std::string_view, size_t> kv_index;
    std::unordered_map<std::string_view, size_t> tensor_index;
};

// ----------------------------------------------------------------------------
// bounds-checked reading

struct GGUFReader {
    const GGUFFile* file = nullptr;
    size_t off = 0;
    std::string where;  // what is being read, for messages: "header", "key 'x'", "tensor #3 'y'"
    int64_t elem = -1;  // index of the array element being read, or -1
};

static const uint8_t* gguf_read_bytes(GGUFReader* r, uint64_t n, const char* what) {
    size_t left = r->file->size - r->off;
    if (n > left) {
        char elem[48] = "";
        if (r->elem >= 0) snprintf(elem, sizeof elem, " element %" PRId64, r->elem);
        fail_at("gguf_read", "'%s' is truncated or corrupt: %s of %s%s at offset %zu needs %" PRIu64
                " bytes but only %zu remain (file size %zu)",
                printable(r->file->path).c_str(), what, r->where.c_str(), elem, r->off, n, left,
                r->file->size);
    }
    const uint8_t* p = r->file->data + r->off;
    r->off += (size_t)n;
    return p;
}

template <class T>
static T gguf_read(GGUFReader* r, const char* what) {
    T v;
    memcpy(&v, gguf_read_bytes(r, sizeof v, what), sizeof v);
    return v;
}

static std::string_view gguf_read_string(GGUFReader* r, const char* what) {
    uint64_t n = gguf_read<uint64_t>(r, what);
    const uint8_t* p = gguf_read_bytes(r, n, what);
    return std::string_view((const char*)p, (size_t)n);
}

// Reads (and, for nested arrays, only skips) one value of the given type.
static void gguf_read_value(GGUFReader* r, uint32_t type, GGUFValue* v, uint32_t depth) {
    v->type = type;
    switch (type) {
        case GGUF_TYPE_UINT8: v->u = gguf_read<uint8_t>(r, "u8 value"); break;
        case GGUF_TYPE_INT8: v->i = gguf_read<int8_t>(r, "i8 value"); break;
        case GGUF_TYPE_UINT16: v->u = gguf_read<uint16_t>(r, "u16 value"); break;
        case GGUF_TYPE_INT16: v->i = gguf_read<int16_t>(r, "i16 value"); break;
        case GGUF_TYPE_UINT32: v->u = gguf_read<uint32_t>(r, "u32 value"); break;
        case GGUF_TYPE_INT32: v->i = gguf_read<int32_t>(r, "i32 value"); break;
        case GGUF_TYPE_UINT64: v->u = gguf_read<uint64_t>(r, "u64 value"); break;
        case GGUF_TYPE_INT64: v->i = gguf_read<int64_t>(r, "i64 value"); break;
        case GGUF_TYPE_FLOAT32: v->f = gguf_read<float>(r, "f32 value"); break;
        case GGUF_TYPE_FLOAT64: v->f = gguf_read<double>(r, "f64 value"); break;
        case GGUF_TYPE_BOOL: v->u = gguf_read<uint8_t>(r, "bool value") != 0; break;
        case GGUF_TYPE_STRING: v->str = gguf_read_string(r, "string value"); break;
        case GGUF_TYPE_ARRAY: {
            if (depth >= GGUF_MAX_ARRAY_DEPTH) {
                fail_at("gguf_read", "'%s' is corrupt: %s nests arrays deeper than %u at offset %zu",
                        printable(r->file->path).c_str(), r->where.c_str(), GGUF_MAX_ARRAY_DEPTH, r->off);
            }
            size_t at = r->off;
            v->arr_type = gguf_read<uint32_t>(r, "array element type");
            v->arr_len = gguf_read<uint64_t>(r, "array length");
            if (v->arr_type >= GGUF_TYPE_COUNT) {
                fail_at("gguf_read", "'%s' is corrupt: %s is an array of unknown value type %u at offset %zu",
                        printable(r->file->path).c_str(), r->where.c_str(), v->arr_type, at);
            }
            size_t left = r->file->size - r->off;
            // the smallest element: a string or an array header takes 8 bytes, a scalar its size
            uint64_t min_elem = v->arr_type == GGUF_TYPE_STRING ? 8
                                : v->arr_type == GGUF_TYPE_ARRAY ? 12 : GGUF_TYPE_SIZE[v->arr_type];
            if (v->arr_len > left / min_elem) {
                fail_at("gguf_read", "'%s' is truncated or corrupt: %s is an array of %" PRIu64
                        " %s at offset %zu, which cannot fit in the %zu bytes left",
                        printable(r->file->path).c_str(), r->where.c_str(), v->arr_len,
                        GGUF_TYPE_NAME[v->arr_type], at, left);
            }
            if (v->arr_type == GGUF_TYPE_STRING) {
                v->arr_str.resize((size_t)v->arr_len);
                for (uint64_t k = 0; k < v->arr_len; k++) {
                    r->elem = (int64_t)k;
                    v->arr_str[k] = gguf_read_string(r, "string");
                }
                r->elem = -1;
            } else if (v->arr_type == GGUF_TYPE_ARRAY) {
                for (uint64_t k = 0; k < v->arr_len; k++) {
                    GGUFValue inner;  // validated and skipped: no key the engine reads is nested
                    gguf_read_value(r, GGUF_TYPE_ARRAY, &inner, depth + 1);
                }
            } else {
                v->arr_data = gguf_read_bytes(r, v->arr_len * min_elem, "array data");
            }
            break;
        }
        default:
            fail_at("gguf_read", "'%s' is corrupt or from a newer GGUF: %s has unknown value type %u "
                    "(at offset %zu)", printable(r->file->path).c_str(), r->where.c_str(), type,
                    r->off - 4);
    }
}

// Two tensors whose data ranges intersect would silently share (and garble) weights: a writer
// never produces that, so it is a corrupt or hand-edited file. Sorted by offset, each tensor must
// end at or before the next one starts.
static void gguf_check_overlaps(const GGUFFile* f) {
    std::vector<const GGUFTensor*> by_offset;
    by_offset.reserve(f->tensors.size());
    for (const GGUFTensor& t : f->tensors) by_offset.push_back(&t);
    std::sort(by_offset.begin(), by_offset.end(), [](const GGUFTensor* a, const GGUFTensor* b) {
        return a->offset != b->offset ? a->offset < b->offset : a->n_bytes < b->n_bytes;
    });
    for (size_t k = 1; k < by_offset.size(); k++) {
        const GGUFTensor* a = by_offset[k - 1];
        const GGUFTensor* b = by_offset[k];
        if (a->offset + a->n_bytes > b->offset) {  // both ranges are inside the file: no overflow
            FAIL("'%s' is corrupt: the data of tensors '%s' (bytes [%" PRIu64 ", %" PRIu64 ")) and '%s' "
                 "(bytes [%" PRIu64 ", %" PRIu64 ")) overlap; re-export the model with tools/convert_gguf.py",
                 printable(f->path).c_str(), printable(a->name).c_str(), f->data_offset + a->offset,
                 f->data_offset + a->offset + a->n_bytes, printable(b->name).c_str(), f->data_offset + b->offset,
                 f->data_offset + b->offset + b->n_bytes);
        }
    }
}

// Parses the header, metadata and tensor table of f->data[0..f->size) and checks that every
// tensor lies inside the file, aligned, and that no two tensors share bytes.
static void gguf_parse(GGUFFile* f) {
    GGUFReader r;
    r.file = f;
    std::string path = printable(f->path);
    r.where = "the header";
    if (f->size < 4) FAIL("'%s' is not a GGUF file: it is only %zu bytes long", path.c_str(), f->size);
    uint32_t magic = gguf_read<uint32_t>(&r, "magic");
    if (magic != GGUF_MAGIC) {
        if (!memcmp(f->data, "ggjt", 4) || !memcmp(f->data, "tjgg", 4) || !memcmp(f->data, "ggml", 4) ||
            !memcmp(f->data, "lmgg", 4) || !memcmp(f->data, "fmgg", 4)) {
            FAIL("'%s' is a pre-GGUF ggml/ggjt file; convert the original model with tools/convert_gguf.py",
                 path.c_str());
        }
        FAIL("'%s' is not a GGUF file: magic is %s, expected \"GGUF\"", path.c_str(),
             printable(std::string_view((const char*)f->data, 4)).c_str());
    }
    f->version = gguf_read<uint32_t>(&r, "version");
    if (f->version == 1) {
        FAIL("'%s' is GGUF v1, which this reader does not support; re-export it with tools/convert_gguf.py",
             path.c_str());
    }
    if (f->version > 0xffff) {
        FAIL("'%s' has version 0x%08x: a big-endian GGUF file? only little-endian files are supported",
             path.c_str(), f->version);
    }
    if (f->version != 2 && f->version != 3) {
        FAIL("'%s' is GGUF version %u; this reader supports versions 2 and 3", path.c_str(), f->version);
    }
    uint64_t n_tensors = gguf_read<uint64_t>(&r, "tensor count");
    uint64_t n_kv = gguf_read<uint64_t>(&r, "metadata count");
    size_t left = f->size - r.off;
    // smallest key/value: 8 (key length) + 4 (type) + 1 (u8); smallest tensor info: 8+4+8+4+8
    if (n_kv > left / 13) {
        FAIL("'%s' is truncated or corrupt: the header at offset 16 claims %" PRIu64 " metadata entries, "
             "which cannot fit in the %zu bytes that follow (file size %zu)", path.c_str(), n_kv, left, f->size);
    }
    if (n_tensors > left / 32) {
        FAIL("'%s' is truncated or corrupt: the header at offset 8 claims %" PRIu64 " tensors, which cannot "
             "fit in the %zu bytes that follow (file size %zu)", path.c_str(), n_tensors, left, f->size);
    }

    f->kvs.resize((size_t)n_kv);
    for (uint64_t k = 0; k < n_kv; k++) {
        GGUFKV* kv = &f->kvs[k];
        kv->raw_begin = r.off;
        r.where = "key #" + std::to_string(k);
        kv->key = gguf_read_string(&r, "key name");
        r.where = "key '" + printable(kv->key) + "'";
        if (!f->kv_index.emplace(kv->key, (size_t)k).second) {
            FAIL("'%s' is corrupt: %s appears twice (offset %" PRIu64 ")", path.c_str(), r.where.c_str(),
                 kv->raw_begin);
        }
        uint32_t type = gguf_read<uint32_t>(&r, "value type");
        gguf_read_value(&r, type, &kv->val, 0);
        kv->raw_end = r.off;
    }

    auto al = f->kv_index.find("general.alignment");
    if (al != f->kv_index.end()) {
        const GGUFValue& v = f->kvs[al->second].val;
        uint64_t a = v.u;
        bool is_uint = v.type == GGUF_TYPE_UINT32 || v.type == GGUF_TYPE_UINT64 || v.type == GGUF_TYPE_UINT16 ||
                       v.type == GGUF_TYPE_UINT8;
        if (!is_uint || a == 0 || (a & (a - 1)) != 0 || a > (1u << 24)) {
            FAIL("'%s' is corrupt: general.alignment must be a power of two up to 2^24, got %s %" PRIu64,
                 path.c_str(), v.type < GGUF_TYPE_COUNT ? GGUF_TYPE_NAME[v.type] : "?", a);
        }
        f->alignment = a;
    }

    f->tensors.resize((size_t)n_tensors);
    for (uint64_t k = 0; k < n_tensors; k++) {
        GGUFTensor* t = &f->tensors[k];
        r.where = "tensor #" + std::to_string(k);
        t->name = gguf_read_string(&r, "tensor name");
        r.where += " '" + printable(t->name) + "'";
        const char* where = r.where.c_str();
        if (t->name.empty()) FAIL("'%s' is corrupt: %s has an empty name", path.c_str(), where);
        if (!f->tensor_index.emplace(t->name, (size_t)k).second) {
            FAIL("'%s' is corrupt: %s appears twice", path.c_str(), where);
        }
        t->n_dims = gguf_read<uint32_t>(&r, "dimension count");
        if (t->n_dims == 0 || t->n_dims > GGUF_MAX_DIMS) {
            FAIL("'%s' is corrupt: %s has %u dimensions (1 to %u allowed)", path.c_str(), where, t->n_dims,
                 GGUF_MAX_DIMS);
        }
        t->n_elements = 1;
        for (uint32_t d = 0; d < t->n_dims; d++) {
            t->ne[d] = gguf_read<uint64_t>(&r, "dimension");
            if (t->ne[d] == 0 || t->ne[d] > (1ull << 40) || t->n_elements > (1ull << 50) / t->ne[d]) {
                FAIL("'%s' is corrupt: %s has an impossible dimension %u of size %" PRIu64, path.c_str(),
                     where, d, t->ne[d]);
            }
            t->n_elements *= t->ne[d];
        }
        t->type = gguf_read<uint32_t>(&r, "tensor type");
        t->offset = gguf_read<uint64_t>(&r, "tensor data offset");
        TypeInfo ti = ggml_type_info(t->type);
        if (!ti.name) FAIL("'%s' is corrupt or too new: %s has unknown tensor type %u", path.c_str(), where, t->type);
        if (!ti.supported) {
            FAIL("%s in '%s' has type %s, which vicuna does not run (it runs F32, F16, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, "
                 "Q2_K..Q6_K); export the model with tools/convert_gguf.py --outtype q8_0 (or vicuna quantize to q4_k_m)",
                 where, path.c_str(), ti.name);
        }
        if (t->ne[0] % ti.block != 0) {
            FAIL("'%s' is corrupt: %s of type %s has a row of %" PRIu64 " elements, not a multiple of %u",
                 path.c_str(), where, ti.name, t->ne[0], ti.block);
        }
        t->n_bytes = t->n_elements / ti.block * ti.block_size;
        if (t->offset % f->alignment != 0) {
            FAIL("'%s' is corrupt: %s data offset %" PRIu64 " is not a multiple of the alignment %" PRIu64,
                 path.c_str(), where, t->offset, f->alignment);
        }
    }

    // the data section starts at the next multiple of the alignment
    uint64_t pad = (f->alignment - r.off % f->alignment) % f->alignment;
    f->data_offset = r.off + pad;
    if (f->data_offset > f->size) {
        if (n_tensors > 0) {
            FAIL("'%s' is truncated: the tensor data section should start at offset %" PRIu64
                 " but the file is %zu bytes", path.c_str(), f->data_offset, f->size);
        }
        f->data_offset = f->size;
    }
    uint64_t data_size = f->size - f->data_offset;
    for (GGUFTensor& t : f->tensors) {
        if (t.offset > data_size || t.n_bytes > data_size - t.offset) {
            FAIL("'%s' is truncated: tensor '%s' needs bytes [%" PRIu64 ", %" PRIu64 ") of the file, which is "
                 "%zu bytes long", path.c_str(), printable(t.name).c_str(), f->data_offset + t.offset,
                 f->data_offset + t.offset + t.n_bytes, f->size);
        }
        t.data = f->data + f->data_offset + t.offset;
    }
    gguf_check_overlaps(f);
}

// Parses a GGUF file held in memory (the caller keeps the buffer alive).
[[maybe_unused]] static void gguf_init_from_buffer(GGUFFile* f, const uint8_t* data, size_t size, const char* name) {
    *f = GGUFFile();
    f->path = name;
    f->data = data;
    f->size = size;
    gguf_parse(f);
}

// What a path that is not a regular file is, for messages.
static const char* file_kind(mode_t mode) {
    if (S_ISDIR(mode)) return "a directory";
    if (S_ISFIFO(mode)) return "a named pipe (FIFO)";
    if (S_ISCHR(mode)) return "a character device";
    if (S_ISBLK(mode)) return "a block device";
    if (S_ISSOCK(mode)) return "a socket";
    return "not a regular file";
}

// Maps a GGUF file read-only and parses it. Only regular files: a named pipe would block open()
// until a writer appears (forever, from the user's point of view), /dev/zero never ends, and a
// directory or device cannot be mapped. The type is checked before open() and again on the
// opened descriptor (O_NONBLOCK: should the path turn into a FIFO in between, open() still returns).
static void gguf_init_from_file(GGUFFile* f, const char* path) {
    *f = GGUFFile();
    f->path = path;
    struct stat st;
    if (stat(path, &st) != 0) FAIL("cannot open '%s': %s", printable(path).c_str(), strerror(errno));
    if (!S_ISREG(st.st_mode)) {
        FAIL("'%s' is %s, not a GGUF file; pass the path of a .gguf model file", printable(path).c_str(),
             file_kind(st.st_mode));
    }
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) FAIL("cannot open '%s': %s", printable(path).c_str(), strerror(errno));
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        FAIL("'%s' is %s, not a GGUF file; pass the path of a .gguf model file", printable(path).c_str(),
             file_kind(st.st_mode));
    }
    if (st.st_size == 0) {
        close(fd);
        FAIL("'%s' is empty: not a GGUF file", printable(path).c_str());
    }
    void* p = mmap(nullptr, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    int err = errno;
    close(fd);
    if (p == MAP_FAILED) FAIL("cannot map '%s': %s", printable(path).c_str(), strerror(err));
    f->mapping = FileMapping((const uint8_t*)p, (size_t)st.st_size);
    f->data = f->mapping.data;
    f->size = f->mapping.size;
    gguf_parse(f);  // on error, f's destructor unmaps the file
}

// ----------------------------------------------------------------------------
// typed metadata access

static const GGUFKV* gguf_find(const GGUFFile* f, std::string_view key) {
    auto it = f->kv_index.find(key);
    return it == f->kv_index.end() ? nullptr : &f->kvs[it->second];
}

static const GGUFTensor* gguf_find_tensor(const GGUFFile* f, std::string_view name) {
    auto it = f->tensor_index.find(name);
    return it == f->tensor_index.end() ? nullptr : &f->tensors[it->second];
}

static bool gguf_is_int(uint32_t t) {
    return t == GGUF_TYPE_UINT8 || t == GGUF_TYPE_INT8 || t == GGUF_TYPE_UINT16 || t == GGUF_TYPE_INT16 ||
           t == GGUF_TYPE_UINT32 || t == GGUF_TYPE_INT32 || t == GGUF_TYPE_UINT64 || t == GGUF_TYPE_INT64;
}
static bool gguf_is_signed(uint32_t t) {
    return t == GGUF_TYPE_INT8 || t == GGUF_TYPE_INT16 || t == GGUF_TYPE_INT32 || t == GGUF_TYPE_INT64;
}

[[noreturn]] static void gguf_wrong_type(const GGUFFile* f, const GGUFKV* kv, const char* want) {
    fail_at("gguf_get", "'%s': key '%s' has type %s, expected %s", printable(f->path).c_str(),
            printable(kv->key).c_str(), GGUF_TYPE_NAME[kv->val.type], want);
}

// An integer key in [lo, hi]; `def` when absent and not required.
static int64_t gguf_get_int(const GGUFFile* f, const char* key, int64_t def, bool required, int64_t lo,
                            int64_t hi) {
    const GGUFKV* kv = gguf_find(f, key);
    if (!kv) {
        if (required) fail_at("gguf_get", "'%s' lacks the metadata key '%s'", printable(f->path).c_str(), key);
        return def;
    }
    if (!gguf_is_int(kv->val.type)) gguf_wrong_type(f, kv, "an integer");
    bool is_signed = gguf_is_signed(kv->val.type);
    bool ok = is_signed ? (kv->val.i >= lo && kv->val.i <= hi)
                        : (kv->val.u <= (uint64_t)hi && (lo <= 0 || kv->val.u >= (uint64_t)lo));
    if (!ok) {
        std::string val = is_signed ? std::to_string(kv->val.i) : std::to_string(kv->val.u);
        fail_at("gguf_get", "'%s': key '%s' is %s, outside the valid range [%" PRId64 ", %" PRId64 "]",
                printable(f->path).c_str(), key, val.c_str(), lo, hi);
    }
    return is_signed ? kv->val.i : (int64_t)kv->val.u;
}

static double gguf_get_float(const GGUFFile* f, const char* key, double def) {
    const GGUFKV* kv = gguf_find(f, key);
    if (!kv) return def;
    if (kv->val.type == GGUF_TYPE_FLOAT32 || kv->val.type == GGUF_TYPE_FLOAT64) return kv->val.f;
    if (gguf_is_int(kv->val.type)) return gguf_is_signed(kv->val.type) ? (double)kv->val.i : (double)kv->val.u;
    gguf_wrong_type(f, kv, "a number");
}

static bool gguf_get_bool(const GGUFFile* f, const char* key, bool def) {
    const GGUFKV* kv = gguf_find(f, key);
    if (!kv) return def;
    if (kv->val.type != GGUF_TYPE_BOOL) gguf_wrong_type(f, kv, "bool");
    return kv->val.u != 0;
}

static std::string_view gguf_get_str(const GGUFFile* f, const char* key, bool required) {
    const GGUFKV* kv = gguf_find(f, key);
    if (!kv) {
        if (required) fail_at("gguf_get", "'%s' lacks the metadata key '%s'", printable(f->path).c_str(), key);
        return {};
    }
    if (kv->val.type != GGUF_TYPE_STRING) gguf_wrong_type(f, kv, "string");
    return kv->val.str;
}

// An array key whose elements have type `elem` (nullptr when absent).
static const GGUFValue* gguf_get_arr(const GGUFFile* f, const char* key, uint32_t elem) {
    const GGUFKV* kv = gguf_find(f, key);
    if (!kv) return nullptr;
    if (kv->val.type != GGUF_TYPE_ARRAY || kv->val.arr_type != elem) {
        std::string want = std::string("array of ") + GGUF_TYPE_NAME[elem];
        if (kv->val.type == GGUF_TYPE_ARRAY && kv->val.arr_type < GGUF_TYPE_COUNT) {
            fail_at("gguf_get", "'%s': key '%s' is an array of %s, expected %s", printable(f->path).c_str(),
                    key, GGUF_TYPE_NAME[kv->val.arr_type], want.c_str());
        }
        gguf_wrong_type(f, kv, want.c_str());
    }
    return &kv->val;
}

template <class T>
static T gguf_arr_at(const GGUFValue* v, uint64_t i) {
    T x;
    memcpy(&x, v->arr_data + i * sizeof(T), sizeof(T));
    return x;
}

// ----------------------------------------------------------------------------
// writing

struct GGUFWriter;
static void gguf_writer_close(GGUFWriter* w, bool ok);

// A GGUF file being written to tmp_path beside path; gguf_writer_close(w, true) renames it to
// path. Not copyable (one writer, one file). A writer destroyed unfinished (an error thrown
// half-way) removes its temporary file, so no half-written file is left behind.
struct GGUFWriter {
    FILE* fp = nullptr;
    std::string path, tmp_path;  // written to tmp_path, renamed to path on success
    uint64_t off = 0;

    GGUFWriter() = default;
    GGUFWriter(const GGUFWriter&) = delete;
    GGUFWriter& operator=(const GGUFWriter&) = delete;
    ~GGUFWriter() { gguf_writer_close(this, false); }
};

// Opens a fresh temporary file beside `path` (".NAME.partial-XXXXXX" in the same folder, so the
// final rename is atomic and never touches another file): an interrupted write leaves no half
// file under the final name, and no user file is clobbered on the way.
static void gguf_writer_open(GGUFWriter* w, const char* path) {
    w->path = path;
    std::string p = path;
    size_t slash = p.rfind('/');
    std::string dir = slash == std::string::npos ? "" : p.substr(0, slash + 1);
    std::string base = slash == std::string::npos ? p : p.substr(slash + 1);
    w->tmp_path = dir + "." + base + ".partial-XXXXXX";
    std::vector<char> name(w->tmp_path.begin(), w->tmp_path.end());
    name.push_back('\0');
    int fd = mkstemp(name.data());
    if (fd < 0) FAIL("cannot create a temporary file beside '%s': %s", printable(path).c_str(), strerror(errno));
    w->tmp_path = name.data();
    mode_t mask = umask(0);
    umask(mask);
    fchmod(fd, 0666 & ~mask);  // mkstemp makes it private; give it the mode a plain fopen() would
    w->fp = fdopen(fd, "wb");
    if (!w->fp) {
        int err = errno;
        close(fd);
        remove(w->tmp_path.c_str());
        FAIL("cannot create '%s': %s", printable(w->tmp_path).c_str(), strerror(err));
    }
    w->off = 0;
}

static void gguf_write(GGUFWriter* w, const void* p, size_t n) {
    if (n && fwrite(p, 1, n, w->fp) != n) {
        FAIL("cannot write '%s': %s", printable(w->tmp_path).c_str(), strerror(errno));
    }
    w->off += n;
}
template <class T>
static void gguf_write_val(GGUFWriter* w, T v) {
    gguf_write(w, &v, sizeof v);
}
static void gguf_write_str(GGUFWriter* w, std::string_view s) {
    gguf_write_val<uint64_t>(w, s.size());
    gguf_write(w, s.data(), s.size());
}
static void gguf_write_pad(GGUFWriter* w, uint64_t alignment) {
    static const uint8_t zeros[64] = {0};
    uint64_t pad = (alignment - w->off % alignment) % alignment;
    while (pad > 0) {
        uint64_t n = pad < sizeof zeros ? pad : sizeof zeros;
        gguf_write(w, zeros, (size_t)n);
        pad -= n;
    }
}

// Closes the file and moves it into place; on failure (or ok == false) removes it.
static void gguf_writer_close(GGUFWriter* w, bool ok) {
    if (!w->fp) return;
    bool closed = fclose(w->fp) == 0;
    w->fp = nullptr;
    if (ok && closed && rename(w->tmp_path.c_str(), w->path.c_str()) == 0) return;
    int err = errno;
    remove(w->tmp_path.c_str());
    if (ok) FAIL("cannot finish '%s': %s", printable(w->path).c_str(), strerror(err));
}
