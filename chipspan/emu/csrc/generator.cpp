// Random generators, one per chip. CPU kernels only accept CPU generators, so each
// emu generator wraps a CPU generator (its "twin") that holds the state; the fallback
// hands the twin to the kernel. Seeding or saving the emu generator acts on the twin.
#include "emu.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/GeneratorForPrivateuseone.h>

#include <array>
#include <mutex>

namespace chipspan_emu {
namespace {

class EmuGenerator final : public c10::GeneratorImpl {
 public:
  EmuGenerator(c10::DeviceIndex chip, at::Generator twin)
      : c10::GeneratorImpl({c10::DeviceType::PrivateUse1, chip},
                           c10::DispatchKeySet(c10::DispatchKey::PrivateUse1)),
        twin_(std::move(twin)) {}

  void set_current_seed(uint64_t seed) override { twin_.set_current_seed(seed); }
  void set_offset(uint64_t offset) override { twin_.set_offset(offset); }
  uint64_t get_offset() const override { return twin_.get_offset(); }
  uint64_t current_seed() const override { return twin_.current_seed(); }
  uint64_t seed() override { return twin_.seed(); }
  void set_state(const c10::TensorImpl& state) override {
    twin_.unsafeGetGeneratorImpl()->set_state(state);
  }
  c10::intrusive_ptr<c10::TensorImpl> get_state() const override {
    return twin_.unsafeGetGeneratorImpl()->get_state();
  }
  const at::Generator& twin() const { return twin_; }

 private:
  EmuGenerator* clone_impl() const override {
    return new EmuGenerator(device().index(), twin_.clone());
  }
  at::Generator twin_;
};

std::array<at::Generator, kMaxChips> g_defaults;
std::array<std::once_flag, kMaxChips> g_defaults_made;

}  // namespace

at::Generator new_generator(c10::DeviceIndex chip) {
  if (chip < 0) chip = current_chip();
  check_chip(chip);
  return at::make_generator<EmuGenerator>(chip, at::detail::createCPUGenerator());
}

const at::Generator& default_generator(c10::DeviceIndex chip) {
  if (chip < 0) chip = current_chip();
  check_chip(chip);
  std::call_once(g_defaults_made[chip], [chip] { g_defaults[chip] = new_generator(chip); });
  return g_defaults[chip];
}

at::Generator cpu_twin(const at::Generator& emu_generator) {
  auto* impl = dynamic_cast<EmuGenerator*>(emu_generator.unsafeGetGeneratorImpl());
  TORCH_CHECK(impl, "expected an emu generator, got one for ", emu_generator.device());
  return impl->twin();
}

}  // namespace chipspan_emu
