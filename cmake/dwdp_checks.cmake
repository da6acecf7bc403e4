# Checks of the build's prerequisites, as functions so that `cmake -P` scripts can test them without a CUDA compiler
# (tests/test_packaging.py). Each one stops the configure step with a message that says what to install.

# The NVSHMEM wheel is built for one CUDA major version (its name ends in -cu12 or -cu13); nvcc must be that major.
# wheel_dist: "nvidia-nvshmem-cu13" (empty when NVSHMEM_HOME is used: nothing to check); nvcc_version: "13.0.88".
function(dwdp_check_cuda_major wheel_dist nvcc_version nvshmem_version)
  string(REGEX MATCH "^([0-9]+)" _nvcc_major "${nvcc_version}")
  if(NOT wheel_dist MATCHES "-cu([0-9]+)$")
    return()
  endif()
  set(_wheel_major "${CMAKE_MATCH_1}")
  if(NOT _wheel_major STREQUAL _nvcc_major)
    set(_also "")
    if(_nvcc_major STREQUAL "13")
      set(_also "For CUDA 13 the plain isolated build also works: pip install -e \".[cu13,test]\"\n")
    endif()
    message(FATAL_ERROR
      "dwdp_ops: the NVSHMEM wheel ${wheel_dist} is built for CUDA ${_wheel_major} but nvcc is CUDA ${nvcc_version}; "
      "both must be the same CUDA major version.\n"
      "For CUDA ${_nvcc_major}, build without build isolation against nvidia-nvshmem-cu${_nvcc_major} (an isolated "
      "build always uses nvidia-nvshmem-cu13; the README's Set up section):\n"
      "  pip install nvidia-nvshmem-cu${_nvcc_major}==${nvshmem_version} \"scikit-build-core>=0.11\" pybind11 cmake ninja && "
      "pip install --no-build-isolation -e \".[cu${_nvcc_major},test]\"\n"
      "(uninstall ${wheel_dist} first where it is installed: the two wheels share one folder).\n${_also}"
      "Or put a CUDA ${_wheel_major} nvcc on PATH (-DCMAKE_CUDA_COMPILER=/path/to/nvcc).")
  endif()
endfunction()

# Exactly one NVSHMEM wheel: nvidia-nvshmem-cu12 and -cu13 install into the same folder (nvidia/nvshmem), so with both
# installed the files are whichever came last. dists: a list of "name version" entries.
function(dwdp_check_one_wheel dists)
  list(LENGTH dists _n)
  if(_n GREATER 1)
    string(REPLACE ";" ", " _all "${dists}")
    message(FATAL_ERROR
      "dwdp_ops: several NVSHMEM wheels are installed (${_all}); they overwrite each other's files in "
      "nvidia/nvshmem. Uninstall all of them and install the one for your nvcc's CUDA major version.")
  endif()
endfunction()
