from setuptools import find_packages, setup

setup(
    name="mdeq",
    version="0.1.0",
    description="Multiscale Deep Equilibrium Models (Bai, Koltun, Kolter, NeurIPS 2020) for classification and segmentation",
    python_requires=">=3.9",
    package_dir={"mdeq": "lib"},
    packages=["mdeq", *(f"mdeq.{name}" for name in find_packages("lib"))],
    install_requires=[
        "torch>=2.0",
        "torchvision>=0.15",
        "yacs>=0.1.8",
        "PyYAML",
        "numpy",
        "tensorboardX",
        "opencv-python-headless",
        "Pillow",
        "tqdm",
        "scikit-learn",  # the quickstart's digits, the solver tools' sample photographs
        "matplotlib",  # tools/plot_convergence.py
    ],
)
