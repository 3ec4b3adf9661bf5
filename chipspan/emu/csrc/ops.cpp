// Kernels of the emu device: tensor creation, copies, views and a boxed fallback that
// runs every other op on the CPU after checking that all its tensors sit on one chip.
#include "emu.h"

#include <ATen/EmptyTensor.h>
#include <ATen/native/CPUFallback.h>
#include <ATen/native/Resize.h>
#include <ATen/native/transformers/attention.h>
#include <ATen/ops/_fused_sdp_choice.h>
#include <ATen/ops/_local_scalar_dense_native.h>
#include <ATen/ops/_reshape_alias_native.h>
#include <ATen/ops/as_strided_native.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/resize_native.h>
#include <ATen/ops/set_native.h>
#include <ATen/ops/unfold_native.h>
#include <ATen/ops/view_as_complex_native.h>
#include <ATen/ops/view_as_real_native.h>
#include <ATen/ops/view_native.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <array>
#include <optional>

namespace chipspan_emu {
namespace {

using at::Tensor;
constexpr auto kEmu = c10::DeviceType::PrivateUse1;

// A CPU tensor over the same host memory as `t` (no copy, no ownership).
Tensor host_view(const Tensor& t) {
  if (!t.is_privateuseone()) return t;
  return at::from_blob(t.data_ptr(), t.sizes(), t.strides(), t.options().device(at::kCPU));
}

// The active profile's refused dtypes (set before any tensor is made; read by every allocation).
std::array<bool, static_cast<size_t>(at::ScalarType::NumOptions)> refused_dtypes{};
std::string profile_name;

// Every tensor made on a chip passes here: a dtype the profile refuses fails as the vendor's plugin does.
void check_dtype(at::ScalarType dtype, c10::Device device) {
  TORCH_CHECK_TYPE(!refused_dtypes[static_cast<size_t>(dtype)], device, " (", profile_name, ") does not support dtype ",
                   c10::toString(dtype), ": keep such tensors on the host or use a narrower dtype");
}

Tensor emu_empty(c10::IntArrayRef size, std::optional<at::ScalarType> dtype,
                 std::optional<at::Layout> layout, std::optional<at::Device> device,
                 std::optional<bool> pin_memory, std::optional<at::MemoryFormat> memory_format) {
  const auto dev = c10::device_or_default(device);
  TORCH_CHECK(c10::layout_or_default(layout) == at::Layout::Strided, "emu tensors are strided only");
  check_dtype(c10::dtype_or_default(dtype), dev);
  c10::DeviceGuard guard(dev);
  return at::detail::empty_generic(size, c10::GetAllocator(kEmu), c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
                                   c10::dtype_or_default(dtype), memory_format);
}

Tensor emu_empty_strided(c10::IntArrayRef size, c10::IntArrayRef stride, std::optional<at::ScalarType> dtype,
                         std::optional<at::Layout> layout, std::optional<at::Device> device,
                         std::optional<bool> pin_memory) {
  const auto dev = c10::device_or_default(device);
  TORCH_CHECK(c10::layout_or_default(layout) == at::Layout::Strided, "emu tensors are strided only");
  check_dtype(c10::dtype_or_default(dtype), dev);
  c10::DeviceGuard guard(dev);
  return at::detail::empty_strided_generic(size, stride, c10::GetAllocator(kEmu),
                                           c10::DispatchKeySet(c10::DispatchKey::PrivateUse1),
                                           c10::dtype_or_default(dtype));
}

// Copies emu<->cpu and emu:i<->emu:j: all memory is host memory, so a CPU copy does it.
Tensor emu_copy_from(const Tensor& self, const Tensor& dst, bool non_blocking) {
  if (self.numel() > 0) {
    host_view(dst).copy_(host_view(self), non_blocking);
  }
  return dst;
}

Tensor emu_copy_from_and_resize(const Tensor& self, const Tensor& dst) {
  c10::DeviceGuard guard(dst.device());
  at::native::resize_(dst, self.sizes(), std::nullopt);
  return emu_copy_from(self, dst, false);
}

at::Scalar emu_local_scalar_dense(const Tensor& self) {
  return at::native::_local_scalar_dense_cpu(host_view(self));
}

Tensor emu_as_strided(const Tensor& self, c10::SymIntArrayRef size, c10::SymIntArrayRef stride,
                      std::optional<c10::SymInt> storage_offset) {
  std::optional<int64_t> offset;
  if (storage_offset) offset = storage_offset->expect_int();
  return at::native::as_strided_tensorimpl(self, C10_AS_INTARRAYREF_SLOW(size),
                                           C10_AS_INTARRAYREF_SLOW(stride), offset);
}

Tensor emu_view(const Tensor& self, c10::SymIntArrayRef size) {
  return at::native::view(self, C10_AS_INTARRAYREF_SLOW(size));
}

Tensor emu_reshape_alias(const Tensor& self, c10::SymIntArrayRef size, c10::SymIntArrayRef stride) {
  return at::native::_reshape_alias(self, C10_AS_INTARRAYREF_SLOW(size), C10_AS_INTARRAYREF_SLOW(stride));
}

const Tensor& emu_resize(const Tensor& self, c10::SymIntArrayRef size,
                         std::optional<at::MemoryFormat> memory_format) {
  c10::DeviceGuard guard(self.device());
  return at::native::resize_(self, C10_AS_INTARRAYREF_SLOW(size), memory_format);
}

Tensor& emu_set_storage(Tensor& self, at::Storage source) { return at::native::set_(self, source); }

Tensor& emu_set_storage_offset(Tensor& self, at::Storage source, int64_t offset, c10::IntArrayRef size,
                               c10::IntArrayRef stride) {
  return at::native::set_storage_cpu_(self, source, offset, size, stride);
}

Tensor& emu_set_tensor(Tensor& self, const Tensor& source) { return at::native::set_tensor_(self, source); }

// Attention picks the fused kernel it would pick on the CPU, so emu matches CPU results.
int64_t emu_sdp_choice(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& mask,
                       double dropout, bool causal, std::optional<double> scale, bool gqa) {
  std::optional<Tensor> host_mask;
  if (mask) host_mask = host_view(*mask);
  return at::_fused_sdp_choice(host_view(q), host_view(k), host_view(v), host_mask, dropout, causal, scale, gqa);
}

// --- the fallback ---------------------------------------------------------------------

std::string where(const c10::Device& d) { return d.str(); }  // "emu:3", or "tpu:3" under a stand-in plugin

// Finds the one chip the op's tensors live on; fails if they span two chips, or if a
// CPU tensor that is not a scalar joins emu tensors (a real chip would refuse both).
// CPU index tensors (x[cpu_index]) are fine, as PyTorch moves them for every device.
struct ChipFinder {
  const c10::OperatorHandle& op;
  std::optional<c10::Device> chip;
  std::optional<c10::Device> host;  // a non-scalar CPU tensor, if any

  void see(const Tensor& t, bool host_ok = false) {
    if (!t.defined()) return;
    if (t.is_privateuseone()) {
      TORCH_CHECK(!chip || *chip == t.device(), op.schema().name(), " got tensors on two chips, ",
                  where(*chip), " and ", where(t.device()), ": move them to one chip with .to(\"",
                  where(*chip), "\") first");
      chip = t.device();
    } else if (t.dim() > 0 && !host_ok) {
      host = t.device();
    }
  }
  void see(const c10::IValue& v) {
    if (v.isTensor()) {
      see(v.toTensor());
    } else if (v.isList()) {
      const bool indices = v.isOptionalTensorList();
      for (const auto& item : v.toListRef()) {
        if (item.isTensor()) see(item.toTensor(), indices);
      }
    } else if (v.isDevice() && v.toDevice().is_privateuseone() && !chip) {
      chip = v.toDevice();
    }
  }
};

bool is_generator(const c10::TypePtr& type) {
  if (type->kind() == c10::TypeKind::GeneratorType) return true;
  auto optional = type->cast<c10::OptionalType>();
  return optional && optional->getElementType()->kind() == c10::TypeKind::GeneratorType;
}

void emu_fallback(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const auto& args = op.schema().arguments();
  const auto first = stack->size() - args.size();
  ChipFinder finder{op};
  for (size_t i = 0; i < args.size(); ++i) finder.see((*stack)[first + i]);
  if (finder.chip && finder.host) {
    TORCH_CHECK(false, op.schema().name(), " got tensors on ", where(*finder.chip), " and ",
                where(*finder.host), ": move them to one device with .to(\"", where(*finder.chip),
                "\") first");
  }
  const auto chip = finder.chip ? finder.chip->index() : current_chip();
  c10::DeviceGuard guard(c10::Device(kEmu, chip));

  // Random ops draw from the chip's generator (through its CPU twin), not the CPU's.
  for (size_t i = 0; i < args.size(); ++i) {
    if (!is_generator(args[i].type())) continue;
    auto& value = (*stack)[first + i];
    if (value.isNone()) {
      value = cpu_twin(default_generator(chip));
    } else {
      const auto device = value.toGenerator().device();
      const c10::Device here(kEmu, chip);
      TORCH_CHECK(device == here, op.schema().name(), " on ", where(here), " got a generator for ", where(device),
                  "; create it with torch.Generator(\"", where(here), "\")");
      value = cpu_twin(value.toGenerator());
    }
  }

  at::native::cpu_fallback(op, stack, /*error_on_views=*/true);

  // Outputs belong on the chip even when the CPU kernel had no emu tensor to copy from.
  if (!finder.chip) return;
  const auto& returns = op.schema().returns();
  for (size_t i = stack->size() - returns.size(); i < stack->size(); ++i) {
    auto& value = (*stack)[i];
    if (value.isTensor() && value.toTensor().defined() && value.toTensor().is_cpu()) {
      value = value.toTensor().to(*finder.chip);
    }
  }
}

}  // namespace

void set_refused_dtypes(const std::vector<at::ScalarType>& dtypes, const std::string& profile) {
  refused_dtypes.fill(false);
  for (const auto dtype : dtypes) refused_dtypes[static_cast<size_t>(dtype)] = true;
  profile_name = profile;
}

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("empty.memory_format", emu_empty);
  m.impl("empty_strided", emu_empty_strided);
  m.impl("_copy_from", emu_copy_from);
  m.impl("_copy_from_and_resize", emu_copy_from_and_resize);
  m.impl("_local_scalar_dense", emu_local_scalar_dense);
  m.impl("as_strided", emu_as_strided);
  m.impl("view", emu_view);
  m.impl("_reshape_alias", emu_reshape_alias);
  m.impl("unfold", at::native::unfold);  // the other views with per-device kernels
  m.impl("view_as_real", at::native::view_as_real);
  m.impl("view_as_complex", at::native::view_as_complex);
  m.impl("resize_", emu_resize);
  m.impl("set_.source_Storage", emu_set_storage);
  m.impl("set_.source_Storage_storage_offset", emu_set_storage_offset);
  m.impl("set_.source_Tensor", emu_set_tensor);
}

TORCH_LIBRARY_IMPL(_, PrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&emu_fallback>());
}

// These ops have a CPU kernel and also a generic decomposition that other devices would
// get, which rounds differently; take the CPU kernel so emu results match CPU results.
TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  for (const char* op : {"silu_backward", "mish_backward", "native_channel_shuffle"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&emu_fallback>());
  }
}

}  // namespace chipspan_emu

namespace at::native {
REGISTER_PRIVATEUSE1_DISPATCH(_fused_sdp_choice_stub, &chipspan_emu::emu_sdp_choice)
}
