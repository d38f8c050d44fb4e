from segtrain.apps.train import main

if __name__ == "__main__":
    main()
