"""Pre-training recipes; each module defines ``get_recipe()`` (installed as keras_pqcl.recipes)."""
