from cema_deploy.cli import main

if __name__ == "__main__":  # not when multiprocessing (spawn) imports this module in a worker
    main()
