"""``python -m beit_lightning`` runs the Hydra app."""

from .cli import main

if __name__ == "__main__":
    main()
