// Schema of mmshiftkv::shiftkv_scores and the Python module mmshiftkv._C whose import registers it.
// The CPU and CUDA kernels register themselves in shiftkv_cpu.cpp and shiftkv_cuda.cu.
// shiftkv_logit_max (CPU only) runs the CPU op's logits GEMM alone, reduced to each row's maximum;
// prompt_moments (CPU only) is ShiftKV's prompt statistics (mean and variance) in one pass;
// weight_products (CPU only) multiplies a weight by a few vectors in one read of it, in a fixed order;
// rotate_half (CPU only) is float32 half-style RoPE in one pass; affine_rotate_half (CPU only) the RoPE of
// the query heads of q_proj outputs offset + scale * base, in one pass (ShiftKV's proxies).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(mmshiftkv, m) {
  m.def(
      "shiftkv_scores(Tensor proxies, Tensor keys, Tensor last_query, Tensor? key_mask, int n_groups, "
      "float tau, float scaling, float anchor_weight, bool anchor_in_groups, str coverage, "
      "bool exclude_last_key) -> Tensor");
  m.def("shiftkv_logit_max(Tensor queries, Tensor keys, float scaling) -> Tensor");
  m.def("prompt_moments(Tensor states, bool per_feature) -> (Tensor, Tensor)");
  m.def("weight_products(Tensor weight, Tensor vectors) -> Tensor");
  m.def("rotate_half(Tensor states, Tensor cos, Tensor sin) -> Tensor");
  m.def(
      "affine_rotate_half(Tensor base, Tensor offset, Tensor scale, Tensor cos, Tensor sin, int heads, "
      "ScalarType dtype) -> Tensor");
}

#if defined(MMSHIFTKV_WITH_CUDA)
constexpr long kWithCuda = 1;
#else
constexpr long kWithCuda = 0;
#endif

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "Compiled ShiftKV scoring op: importing it registers torch.ops.mmshiftkv.",
      -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddIntConstant(module, "WITH_CUDA", kWithCuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
