// Flattening: copies many per-conversation arrays into one token buffer and one mask buffer,
// converting dtypes and validating values in the same pass (one read of every token, no second
// scan for negative ids or non-0/1 masks). The pybind11 layer gathers the array pointers.
#include <cstring>

#include "packing.h"

namespace refit_packing {

namespace {

// Copies n elements of type S (stride in bytes) to O (int64, or int32 when every source type fits
// in it). Returns the index of the first negative value (or, for uint64, value above INT64_MAX:
// both set bit 63 once widened), else -1. The check is an OR over the values, so the common
// (valid) case costs no branch per element.
template <class S, class O>
int64_t copy_ids(const char* p, int64_t stride, int64_t n, O* out) {
  uint64_t bits = 0;
  if (stride == static_cast<int64_t>(sizeof(S))) {
    const S* s = reinterpret_cast<const S*>(p);
    for (int64_t j = 0; j < n; ++j) {
      bits |= static_cast<uint64_t>(s[j]);  // sign-extends: negatives set bit 63
      out[j] = static_cast<O>(s[j]);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      S v;
      std::memcpy(&v, p + j * stride, sizeof(S));
      bits |= static_cast<uint64_t>(v);
      out[j] = static_cast<O>(v);
    }
  }
  if ((bits >> 63) == 0) return -1;
  for (int64_t j = 0; j < n; ++j)
    if (out[j] < 0) return j;  // negative, or a uint64 that wrapped
  return -1;
}

// Copies n mask values of type S to uint8 0/1. Returns the index of the first value that is not 0
// or 1, else -1.
template <class S>
int64_t copy_mask(const char* p, int64_t stride, int64_t n, uint8_t* out) {
  uint64_t bad = 0;
  for (int64_t j = 0; j < n; ++j) {
    S v;
    std::memcpy(&v, p + j * stride, sizeof(S));  // compiles to a plain load; any alignment is fine
    bad |= static_cast<uint64_t>(v) & ~uint64_t(1);
    out[j] = static_cast<uint8_t>(v);
  }
  if (bad == 0) return -1;
  for (int64_t j = 0; j < n; ++j) {
    S v;
    std::memcpy(&v, p + j * stride, sizeof(S));
    if (static_cast<uint64_t>(v) & ~uint64_t(1)) return j;
  }
  return -1;
}

template <class F>
int64_t dispatch_int(char kind, int itemsize, F&& f) {
  if (kind == 'i') {
    switch (itemsize) {
      case 1: return f(int8_t{});
      case 2: return f(int16_t{});
      case 4: return f(int32_t{});
      case 8: return f(int64_t{});
    }
  } else if (kind == 'u' || kind == 'b') {
    switch (itemsize) {
      case 1: return f(uint8_t{});
      case 2: return f(uint16_t{});
      case 4: return f(uint32_t{});
      case 8: return f(uint64_t{});
    }
  }
  throw std::invalid_argument(std::string("unsupported dtype kind ") + kind + " of size " +
                              std::to_string(itemsize));
}

}  // namespace

template <class O>
FlattenError concat_conversations(const std::vector<ArrayRef>& ids, const std::vector<ArrayRef>& masks,
                                  O* out_ids, uint8_t* out_mask) {
  int64_t at = 0;
  for (size_t i = 0; i < ids.size(); ++i) {
    const ArrayRef& a = ids[i];
    const int64_t bad = dispatch_int(a.kind, a.itemsize, [&](auto tag) {
      return copy_ids<decltype(tag), O>(a.data, a.stride, a.size, out_ids + at);
    });
    if (bad >= 0) return {static_cast<int64_t>(i), FlattenError::kNegativeId, bad};
    const ArrayRef& m = masks[i];
    const int64_t bad_m = dispatch_int(m.kind, m.itemsize, [&](auto tag) {
      return copy_mask<decltype(tag)>(m.data, m.stride, m.size, out_mask + at);
    });
    if (bad_m >= 0) return {static_cast<int64_t>(i), FlattenError::kMaskValue, bad_m};
    at += a.size;
  }
  return {};
}

template FlattenError concat_conversations<int64_t>(const std::vector<ArrayRef>&,
                                                    const std::vector<ArrayRef>&, int64_t*, uint8_t*);
template FlattenError concat_conversations<int32_t>(const std::vector<ArrayRef>&,
                                                    const std::vector<ArrayRef>&, int32_t*, uint8_t*);

}  // namespace refit_packing
