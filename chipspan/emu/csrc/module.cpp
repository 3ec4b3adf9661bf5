// Python bindings of the emu backend (loaded as chipspan.emu's compiled module).
#include "emu.h"

#include <torch/csrc/Generator.h>
#include <torch/extension.h>

namespace emu = chipspan_emu;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("max_chips", [] { return int(emu::kMaxChips); });
  m.def("chip_count", [] { return int(emu::chip_count()); });
  m.def("set_chip_count", &emu::set_chip_count);
  m.def("current_chip", [] { return int(emu::current_chip()); });
  m.def("set_current_chip", [](int chip) { emu::set_current_chip(chip); });
  m.def("memory", [](int chip) {
    emu::check_chip(chip);
    const auto memory = emu::chip_memory(chip);
    return py::make_tuple(memory.allocated, memory.peak, memory.limit);
  });
  m.def("memory_info", [](int chip) {  // (free, total) bytes: the limit, or the host's memory without one
    emu::check_chip(chip);
    const auto info = emu::memory_info(chip);
    return py::make_tuple(info.first, info.second);
  });
  m.def("reset_peak", [](int chip) { emu::reset_peak(chip); });
  m.def("set_limit", [](int chip, int64_t limit) {  // any chip up to the maximum, enabled or not
    TORCH_CHECK(chip >= 0 && chip < emu::kMaxChips, "no chip emu:", chip);
    emu::set_limit(chip, limit);
  });
  m.def("set_refused_dtypes", &emu::set_refused_dtypes);
  m.def("default_generator", [](int chip) {
    return py::reinterpret_steal<py::object>(THPGenerator_initDefaultGenerator(emu::default_generator(chip)));
  });
}
