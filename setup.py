from setuptools import setup

setup(
    name="mdeq",
    version="0.1.0",
    description="Multiscale Deep Equilibrium Models (Bai, Koltun, Kolter, NeurIPS 2020) for classification and segmentation",
    python_requires=">=3.9",
    package_dir={"mdeq": "lib"},
    packages=[
        "mdeq",
        "mdeq.config",
        "mdeq.models",
        "mdeq.modules",
        "mdeq.solvers",
        "mdeq.analysis",
        "mdeq.datasets",
        "mdeq.core",
        "mdeq.utils",
    ],
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
