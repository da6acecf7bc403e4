export NVSHMEM_DISABLE_NVLS=1
env | grep -i -E "nvshmem|LD_" ; cat /etc/nvshmem.conf ~/.nvshmem.conf 2>/dev/null
NV=$(python3 -c "import nvidia.nvshmem as m; print(list(m.__path__)[0])")
echo "== ctypes direct"; python3 -X faulthandler -c "
import ctypes; l=ctypes.CDLL('$NV/lib/libnvshmem_host.so.3', mode=ctypes.RTLD_GLOBAL)
b=ctypes.create_string_buffer(128); b[0]=1
print('rc', l.nvshmemx_get_uniqueid(b))" 2>&1 | tail -3
echo "== probe exe"; nvcc -O2 -rdc=true -gencode arch=compute_90,code=sm_90 -I$NV/include scripts/probe_nvs.cu $NV/lib/libnvshmem_device.a -o /tmp/nvs -L$NV/lib -l:libnvshmem_host.so.3 -Xlinker -rpath=$NV/lib 2>&1 | grep -i error
(cd /tmp && RANK=0 WORLD=1 UIDFILE=/tmp/u.bin timeout 30 ./nvs 2>&1 | head -3)
echo "== gdb"; cuda-gdb -batch -ex run -ex bt --args python3 -c "
import dwdp_ops; from dwdp_ops._native import native; c=native(); u=c.get_unique_id(0); print('uid ok', len(u))" 2>&1 | grep -v "^\[New Thread\|^\[Thread" | tail -30
