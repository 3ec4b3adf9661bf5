// The chips themselves: how many there are, the current chip per thread, the device
// guard (streams and events are no-ops: every op finishes before it returns) and the
// PrivateUse1 hooks through which PyTorch reaches generators, pinned memory and storage.
#include "emu.h"

#include <ATen/detail/PrivateUse1HooksInterface.h>
#include <ATen/native/Resize.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <atomic>

namespace chipspan_emu {
namespace {

std::atomic<c10::DeviceIndex> g_chip_count{1};
thread_local c10::DeviceIndex t_current_chip = 0;

constexpr auto kEmu = c10::DeviceType::PrivateUse1;

struct EmuGuard final : public c10::impl::DeviceGuardImplInterface {
  c10::DeviceType type() const override { return kEmu; }

  c10::Device exchangeDevice(c10::Device d) const override {
    auto old = getDevice();
    setDevice(d);
    return old;
  }
  c10::Device getDevice() const override { return {kEmu, current_chip()}; }
  void setDevice(c10::Device d) const override { set_current_chip(d.index()); }
  void uncheckedSetDevice(c10::Device d) const noexcept override {
    if (d.index() >= 0 && d.index() < chip_count()) t_current_chip = d.index();
  }
  c10::DeviceIndex deviceCount() const noexcept override { return chip_count(); }

  c10::Stream getStream(c10::Device d) const override {
    return c10::Stream(c10::Stream::DEFAULT, d);
  }
  c10::Stream exchangeStream(c10::Stream s) const override { return s; }
  bool queryStream(const c10::Stream&) const override { return true; }
  void synchronizeStream(const c10::Stream&) const override {}
  void synchronizeDevice(c10::DeviceIndex) const override {}

  void record(void**, const c10::Stream&, c10::DeviceIndex, c10::EventFlag) const override {}
  void block(void*, const c10::Stream&) const override {}
  bool queryEvent(void*) const override { return true; }
  void synchronizeEvent(void*) const override {}
};

struct EmuHooks final : public at::PrivateUse1HooksInterface {
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
  void init() const override {}

  c10::DeviceIndex deviceCount() const override { return chip_count(); }
  void setCurrentDevice(c10::DeviceIndex chip) const override { set_current_chip(chip); }
  c10::DeviceIndex getCurrentDevice() const override { return current_chip(); }
  c10::DeviceIndex exchangeDevice(c10::DeviceIndex chip) const override {
    auto old = current_chip();
    set_current_chip(chip);
    return old;
  }
  c10::DeviceIndex maybeExchangeDevice(c10::DeviceIndex chip) const override {
    return exchangeDevice(chip);
  }

  const at::Generator& getDefaultGenerator(c10::DeviceIndex chip) const override {
    return default_generator(chip);
  }
  at::Generator getNewGenerator(c10::DeviceIndex chip) const override {
    return new_generator(chip);
  }

  at::Device getDeviceFromPtr(void* data) const override { return device_of_pointer(data); }
  bool isPinnedPtr(const void* data) const override { return is_pinned(data); }
  at::Allocator* getPinnedMemoryAllocator() const override { return pinned_allocator(); }

  void resizePrivateUse1Bytes(const c10::Storage& storage, size_t bytes) const override {
    c10::DeviceGuard guard(storage.device());
    at::native::resize_bytes_cpu(storage.unsafeGetStorageImpl(), bytes);
  }
};

C10_REGISTER_GUARD_IMPL(PrivateUse1, EmuGuard);

const bool g_hooks_registered = [] {
  at::RegisterPrivateUse1HooksInterface(new EmuHooks());  // never freed: used until exit
  return true;
}();

}  // namespace

c10::DeviceIndex chip_count() { return g_chip_count.load(); }

void set_chip_count(int64_t n) {
  TORCH_CHECK(n >= 1 && n <= kMaxChips, "emu supports 1 to ", int(kMaxChips), " chips, not ", n);
  for (c10::DeviceIndex chip = n; chip < kMaxChips; ++chip) {
    TORCH_CHECK(chip_memory(chip).allocated == 0, "cannot shrink emu to ", n,
                " chips: emu:", int(chip), " still holds tensors; free them first");
  }
  g_chip_count = static_cast<c10::DeviceIndex>(n);
  if (t_current_chip >= n) t_current_chip = 0;
}

c10::DeviceIndex current_chip() { return t_current_chip; }

void set_current_chip(c10::DeviceIndex chip) {
  if (chip < 0) return;  // -1 means "the current chip"
  check_chip(chip);
  t_current_chip = chip;
}

void check_chip(c10::DeviceIndex chip) {
  TORCH_CHECK(chip >= 0 && chip < chip_count(), "emu:", int(chip), " does not exist: emu has ",
              int(chip_count()), " chips (emu:0 to emu:", int(chip_count()) - 1,
              "); ask for more with chipspan.emu.enable(num_chips=...)");
}

}  // namespace chipspan_emu
