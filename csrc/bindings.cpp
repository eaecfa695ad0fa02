// pybind11 shell around packing.h: converts numpy arrays, checks what the core assumes, and
// releases the GIL for the O(n) work. Exposed as refit_fast._packing; the Python API lives in
// refit_fast/packing/, which is the only intended caller.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <string>

#include "packing.h"

namespace py = pybind11;
using namespace refit_packing;

namespace {

// No forcecast: a wrong dtype is the caller's bug and must not be converted silently.
template <class T>
using CArray = py::array_t<T, py::array::c_style>;

template <class T>
py::array_t<T> to_numpy(const std::vector<T>& v) {
  py::array_t<T> out(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(out.mutable_data(), v.data(), v.size() * sizeof(T));
  return out;
}

template <class T>
const T* data1d(const CArray<T>& a, const char* name) {
  if (a.ndim() != 1) throw std::invalid_argument(std::string(name) + " must be 1-D");
  return a.data();
}

py::tuple plan(const CArray<int64_t>& lengths, int64_t max_tokens, int strategy, uint64_t seed) {
  if (strategy != 0 && strategy != 1) throw std::invalid_argument("strategy must be 0 (bfd) or 1 (ffs)");
  const int64_t* len = data1d(lengths, "lengths");
  const int64_t n = lengths.shape(0);
  Plan p;
  {
    py::gil_scoped_release nogil;
    p = plan_bins(len, n, max_tokens, static_cast<Strategy>(strategy), seed);
  }
  return py::make_tuple(to_numpy(p.bin_offsets), to_numpy(p.items));
}

// Output array `key` of n elements: a view of the caller's buffer out[key] when given (no
// allocation, no first-touch page faults: the fast path for repeated packing), else a new array.
template <class T>
py::array_t<T> output(const py::object& out, const char* key, int64_t n) {
  if (out.is_none()) return py::array_t<T>(static_cast<py::ssize_t>(n));  // uninitialized (np.empty)
  py::dict d = out.cast<py::dict>();
  if (!d.contains(key)) throw std::invalid_argument(std::string("out has no '") + key + "' buffer");
  py::object obj = d[key];
  if (!py::isinstance<py::array_t<T>>(obj))  // equivalent dtype only: never a silent conversion
    throw std::invalid_argument(std::string("out['") + key + "'] must be a numpy array of " +
                                py::str(py::dtype::of<T>()).cast<std::string>());
  auto buf = py::array(obj);
  if (buf.ndim() != 1 || !(buf.flags() & py::array::c_style) || !buf.writeable())
    throw std::invalid_argument(std::string("out['") + key + "'] must be 1-D, contiguous, writeable");
  if (buf.shape(0) < n)
    throw std::invalid_argument(std::string("out['") + key + "'] holds " + std::to_string(buf.shape(0)) +
                                " elements, " + std::to_string(n) + " needed");
  // A view of the first n elements that keeps the buffer alive.
  return py::array_t<T>(static_cast<py::ssize_t>(n), static_cast<T*>(buf.mutable_data()), buf);
}

template <class T, class I>
py::dict materialize_as(const I* ids, const uint8_t* mask, const int64_t* conv_off,
                        const int64_t* bin_off, int64_t n_bins, const int64_t* items,
                        const RowLayout& lay, int64_t pad_to, int64_t pad_id, bool local_seq_ids,
                        const py::object& out) {
  const int64_t total = lay.total_tokens;
  py::array_t<T> o_ids = output<T>(out, "input_ids", total);
  py::array_t<T> o_lab = output<T>(out, "labels", total);
  py::array_t<T> o_pos = output<T>(out, "position_ids", total);
  py::array_t<T> o_seq = output<T>(out, "seq_ids", total);
  py::array_t<int32_t> o_cu = output<int32_t>(out, "cu_seqlens", lay.total_cu);
  py::array_t<int64_t> o_max(static_cast<py::ssize_t>(n_bins));
  T *pi = o_ids.mutable_data(), *pl = o_lab.mutable_data(), *pp = o_pos.mutable_data(),
    *ps = o_seq.mutable_data();
  int32_t* pc = o_cu.mutable_data();
  int64_t* pm = o_max.mutable_data();
  bool fits;
  {
    py::gil_scoped_release nogil;
    fits = fill_rows<T, I>(ids, mask, conv_off, bin_off, n_bins, items, lay, pad_to, pad_id,
                           local_seq_ids, pi, pl, pp, ps, pc, pm);
  }
  if (!fits) {
    // Rare path: name the first offending conversation (in row order) for the error message.
    for (int64_t k = 0; k < bin_off[n_bins]; ++k) {
      const int64_t c = items[k];
      for (int64_t j = conv_off[c]; j < conv_off[c + 1]; ++j) {
        if (ids[j] < 0)
          throw std::invalid_argument("conversation " + std::to_string(c) + ": negative token id " +
                                      std::to_string(int64_t{ids[j]}) + " at position " +
                                      std::to_string(j - conv_off[c]));
        if (sizeof(T) == 4 && int64_t{ids[j]} > INT32_MAX)
          throw std::invalid_argument("conversation " + std::to_string(c) + ": token id " +
                                      std::to_string(int64_t{ids[j]}) +
                                      " does not fit in int32; use dtype=np.int64");
      }
    }
    throw std::invalid_argument("token ids do not fit the output dtype");
  }
  py::dict d;
  d["input_ids"] = o_ids;
  d["labels"] = o_lab;
  d["position_ids"] = o_pos;
  d["seq_ids"] = o_seq;
  d["cu_seqlens"] = o_cu;
  d["max_seqlen"] = o_max;
  d["row_offsets"] = to_numpy(lay.row_offsets);
  d["cu_offsets"] = to_numpy(lay.cu_offsets);
  d["real_tokens"] = lay.real_tokens;
  return d;
}

// Token ids as the data set holds them: int64 or int32, native byte order, contiguous. Checked
// here, not converted: a silent widening copy is exactly the cost int32 support exists to avoid.
bool int32_ids(const py::array& ids) {
  if (ids.ndim() != 1) throw std::invalid_argument("ids must be 1-D");
  if (!(ids.flags() & py::array::c_style)) throw std::invalid_argument("ids must be contiguous");
  const py::dtype dt = ids.dtype();
  if (dt.equal(py::dtype::of<int64_t>())) return false;
  if (dt.equal(py::dtype::of<int32_t>())) return true;
  throw std::invalid_argument("ids must be int64 or int32 in native byte order, got " +
                              py::str(dt).cast<std::string>());
}

template <class I>
py::dict materialize_ids(const I* pid, const py::array& ids, const CArray<uint8_t>& mask,
                         const CArray<int64_t>& conv_offsets, const CArray<int64_t>& bin_offsets,
                         const CArray<int64_t>& items, int64_t pad_to, int64_t pad_id,
                         bool int32_out, bool local_seq_ids, const py::object& out) {
  const uint8_t* pmask = data1d(mask, "mask");
  const int64_t* poff = data1d(conv_offsets, "conv_offsets");
  const int64_t* pbin = data1d(bin_offsets, "bin_offsets");
  const int64_t* pit = data1d(items, "items");
  if (mask.shape(0) != ids.shape(0)) throw std::invalid_argument("ids and mask differ in length");
  if (conv_offsets.shape(0) < 1 || bin_offsets.shape(0) < 1)
    throw std::invalid_argument("offset arrays need at least one element");
  const int64_t n_conv = conv_offsets.shape(0) - 1;
  // The fill loop reads ids[conv_offsets[c] : conv_offsets[c+1]] unchecked; layout_rows proves
  // that range in bounds for every conversation the plan references (and only those: a batch of
  // a few rows must not pay for scanning every offset of the dataset).
  if (poff[0] != 0 || poff[n_conv] != ids.shape(0))
    throw std::invalid_argument("conv_offsets must start at 0 and end at len(ids)");
  if (pad_to < 0) throw std::invalid_argument("pad_to must be >= 0 (0 = no padding)");
  const int64_t n_bins = bin_offsets.shape(0) - 1;
  const RowLayout lay =
      layout_rows(poff, n_conv, ids.shape(0), pbin, n_bins, pit, items.shape(0), pad_to);
  if (int32_out)
    return materialize_as<int32_t, I>(pid, pmask, poff, pbin, n_bins, pit, lay, pad_to, pad_id,
                                      local_seq_ids, out);
  return materialize_as<int64_t, I>(pid, pmask, poff, pbin, n_bins, pit, lay, pad_to, pad_id,
                                    local_seq_ids, out);
}

py::dict materialize(const py::array& ids, const CArray<uint8_t>& mask,
                     const CArray<int64_t>& conv_offsets, const CArray<int64_t>& bin_offsets,
                     const CArray<int64_t>& items, int64_t pad_to, int64_t pad_id, bool int32_out,
                     bool local_seq_ids, const py::object& out) {
  if (int32_ids(ids))
    return materialize_ids(static_cast<const int32_t*>(ids.data()), ids, mask, conv_offsets,
                           bin_offsets, items, pad_to, pad_id, int32_out, local_seq_ids, out);
  return materialize_ids(static_cast<const int64_t*>(ids.data()), ids, mask, conv_offsets,
                         bin_offsets, items, pad_to, pad_id, int32_out, local_seq_ids, out);
}

[[noreturn]] void bad_conversation(size_t i, const std::string& why) {
  throw std::invalid_argument("conversation " + std::to_string(i) + ": " + why);
}

std::string dtype_name(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

bool native_byte_order(const py::dtype& dt) {
  const uint16_t probe = 1;
  const char native = *reinterpret_cast<const uint8_t*>(&probe) == 1 ? '<' : '>';
  const char bo = dt.byteorder();
  return bo == '=' || bo == '|' || bo == native;
}

// flatten's core: checks every conversation's arrays (1-D, equal non-zero lengths, integer ids,
// bool/integer mask) with the GIL held, then copies and checks values (ids >= 0, mask 0/1) without
// it. Errors name the first bad conversation: shape and dtype problems over all conversations
// first, then values, the same order as the numpy fallback in refit_fast/packing/flat.py.
py::object flatten_arrays(const py::list& ids, const py::list& masks) {
  const size_t n = ids.size();
  if (masks.size() != n) throw std::invalid_argument("ids and masks differ in count");
  std::vector<ArrayRef> ri(n), rm(n);
  bool wide = (n == 0);  // no conversations: int64, as before
  py::array_t<int64_t> offsets(static_cast<py::ssize_t>(n + 1));
  int64_t* off = offsets.mutable_data();
  off[0] = 0;
  for (size_t i = 0; i < n; ++i) {
    if (!py::isinstance<py::array>(ids[i]) || !py::isinstance<py::array>(masks[i]))
      bad_conversation(i, "input_ids and loss_mask must be numpy arrays");
    auto a = py::reinterpret_borrow<py::array>(ids[i]);
    auto m = py::reinterpret_borrow<py::array>(masks[i]);
    if (a.ndim() != 1 || m.ndim() != 1) bad_conversation(i, "input_ids and loss_mask must be 1-D");
    if (m.shape(0) != a.shape(0))
      bad_conversation(i, "loss_mask has length " + std::to_string(m.shape(0)) + " but input_ids has length " +
                              std::to_string(a.shape(0)));
    if (a.shape(0) == 0) bad_conversation(i, "is empty");
    // The copy loops read raw native integers: swapped-byte-order arrays go back to Python to be
    // converted (None = "convert and call again"), never misread.
    if (!native_byte_order(a.dtype()) || !native_byte_order(m.dtype())) return py::none();
    const char ka = a.dtype().kind(), km = m.dtype().kind();
    if (ka != 'i' && ka != 'u') bad_conversation(i, "input_ids must be integers, got dtype " + dtype_name(a));
    if (km != 'b' && km != 'i' && km != 'u')
      bad_conversation(i, "loss_mask must be bool or integer, got dtype " + dtype_name(m));
    ri[i] = {static_cast<const char*>(a.data()), a.shape(0), a.strides(0), ka, static_cast<int>(a.itemsize())};
    // Ids come out int32 when every array's type always fits in it (as the numpy path decides).
    wide = wide || (ka == 'i' ? a.itemsize() > 4 : a.itemsize() > 2);
    rm[i] = {static_cast<const char*>(m.data()), m.shape(0), m.strides(0), km, static_cast<int>(m.itemsize())};
    off[i + 1] = off[i] + a.shape(0);
  }
  const int64_t total = off[n];
  py::array out_ids = wide ? py::array(py::array_t<int64_t>(static_cast<py::ssize_t>(total)))
                           : py::array(py::array_t<int32_t>(static_cast<py::ssize_t>(total)));
  py::array_t<uint8_t> out_mask(static_cast<py::ssize_t>(total));
  void* pi = out_ids.mutable_data();
  uint8_t* pm = out_mask.mutable_data();
  FlattenError err;
  {
    py::gil_scoped_release nogil;
    err = wide ? concat_conversations(ri, rm, static_cast<int64_t*>(pi), pm)
               : concat_conversations(ri, rm, static_cast<int32_t*>(pi), pm);
  }
  if (err.what != FlattenError::kNone) {  // rare path: read the offending value back through Python
    const size_t i = static_cast<size_t>(err.conversation);
    const bool mask_error = err.what == FlattenError::kMaskValue;
    const std::string value = py::str((mask_error ? masks : ids)[i].attr("item")(err.position)).cast<std::string>();
    if (mask_error) bad_conversation(i, "loss_mask values must be 0 or 1, got " + value);
    if (ri[i].kind == 'u') bad_conversation(i, "input_ids do not fit in int64 (id " + value + ")");
    bad_conversation(i, "negative token id " + value + " at position " + std::to_string(err.position));
  }
  return py::make_tuple(out_ids, out_mask, offsets);
}

}  // namespace

PYBIND11_MODULE(_packing, m) {
  m.doc() = "C++ core of refit_fast.packing (use refit_fast.packing.pack, not this module).";
  m.def("plan", &plan, py::arg("lengths"), py::arg("max_tokens"), py::arg("strategy"),
        py::arg("seed"),
        "Plan bins: returns (bin_offsets int64[bins+1], items int64[kept]); lengths > max_tokens "
        "are skipped. strategy 0 = best-fit-decreasing, 1 = first-fit over shuffled input.");
  m.def("flatten", &flatten_arrays, py::arg("ids"), py::arg("masks"),
        "Check and concatenate per-conversation 1-D arrays (lists of numpy arrays) into (ids int64, "
        "or int32 when every ids array is int8/16/32 or uint8/16; mask uint8; offsets int64[n+1]); "
        "raises ValueError naming the first bad conversation. "
        "Returns None, copying nothing, if some array is not in native byte order.");
  m.def("materialize", &materialize, py::arg("ids"), py::arg("mask"), py::arg("conv_offsets"),
        py::arg("bin_offsets"), py::arg("items"), py::arg("pad_to"), py::arg("pad_id"),
        py::arg("int32_out"), py::arg("local_seq_ids"), py::arg("out") = py::none(),
        "Fill all rows of a plan into flat arrays (GIL released); returns a dict of arrays. With out "
        "(a dict of 1-D buffers), the token arrays and cu_seqlens are views of those buffers. "
        "local_seq_ids: seq_ids number the segments of each row 0..k-1 instead of naming the "
        "conversation.");
}
