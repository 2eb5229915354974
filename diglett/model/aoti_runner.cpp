// A compiled int8 ECAPA package's model, callable from Python with the GIL
// released while it runs (diglett/compiled_int8.py builds this next to the
// package). PyTorch's own binding holds the GIL for the whole forward
// (pytorch/pytorch#197516), which stalls the replica's event loop for
// every batch; the traced model it replaces does not.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/extension.h>

namespace {

class Runner {
 public:
  explicit Runner(const std::string& package) : loader_(package) {}

  // x: (batch, frames, 80) float32 features -> (batch, 1, 192) embeddings.
  at::Tensor run(const at::Tensor& x) {
    pybind11::gil_scoped_release no_gil;
    return loader_.run({x})[0];
  }

 private:
  torch::inductor::AOTIModelPackageLoader loader_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Runner>(m, "Runner")
      .def(pybind11::init<const std::string&>())
      .def("run", &Runner::run);
}
