"""``python -m dropreg_ext.info``: what was built, against what, and which backends run here."""

import torch

import dropreg_ext as dr


def main() -> None:
    info = dr.build_info()
    built = info["built_against"]
    print(f"dropreg_ext {info['dropreg_ext']}  (torch installed: {info['torch_installed']})")
    if info["extension_loaded"]:
        print(f"extension dropreg_ext._C: built against torch {built['torch']}, "
              f"CUDA {built['cuda'] or '-'}, archs {built['cuda_archs'] or '-'}")
        print(f"compiled backends: {', '.join(built['backends'])}")
        print(f"CPU loops of every op: {info['cpu_dropout_path']} (DROPREG_CPU_CAPABILITY=avx2 or =default caps it)")
        mapping = "on" if dr._ext.C.cpu_prefault() else "off"
        print(f"CPU fresh-output page mapping: {mapping} (DROPREG_CPU_PREFAULT=0 turns it off)")
    else:
        print("extension dropreg_ext._C: NOT loaded (reference fallback in use)")
    print(f"triton: {'available' if info['triton'] else 'not installed'}")
    print(f"CUDA device visible: {info['cuda_device']}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        print(f"backends usable on {dev}: {', '.join(dr.ops.available_backends(dev))}")
    print(f"current backend: {info['backend']}")


if __name__ == "__main__":
    main()
