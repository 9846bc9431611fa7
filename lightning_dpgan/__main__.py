from lightning_dpgan.cli import run

if __name__ == "__main__":
    run()
